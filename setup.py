"""The native data plane (agent/native) is the one compiled part; everything
else is in pyproject.toml.  Needs gcc, python3-dev, libssl-dev, libisal-dev."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "agent.native._native",
    sources=["agent/native/module.c", "agent/native/chain.c", "agent/native/pump.c",
             "agent/native/accept.c"],
    depends=["agent/native/native.h"],
    libraries=["crypto", "isal"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
)])
