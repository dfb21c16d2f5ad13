"""The native data plane (agent/native) is the one compiled part; everything
else is in pyproject.toml.  Needs gcc, python3-dev, libssl-dev, libisal-dev
and librust-blake3-dev (Debian ships the BLAKE3 team's C implementation in
that package; it is compiled in, nothing is linked at run time)."""
import glob
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BLAKE3_GLOB = "/usr/share/cargo/registry/blake3-1.*/c"


def blake3_sources() -> tuple[str, list[str], list[tuple[str, str]]]:
    """(include dir, sources, macros) of the newest BLAKE3 C tree installed."""
    found = sorted(glob.glob(BLAKE3_GLOB))
    if not found:
        sys.exit(f"setup.py: BLAKE3's C sources not found ({BLAKE3_GLOB}): "
                 "apt-get install librust-blake3-dev")
    c = found[-1]
    sources = [f"{c}/blake3.c", f"{c}/blake3_dispatch.c", f"{c}/blake3_portable.c"]
    if platform.machine() == "x86_64":  # its hand-written kernels, picked at run time by CPU
        sources += [f"{c}/blake3_{isa}_x86-64_unix.S" for isa in ("sse2", "sse41", "avx2", "avx512")]
        return c, sources, []
    return c, sources, [(f"BLAKE3_NO_{isa}", "1") for isa in ("SSE2", "SSE41", "AVX2", "AVX512")]


class BuildExt(build_ext):
    """Adds BLAKE3 only while compiling: the sdist and egg-info steps that may
    follow in the same process refuse a path outside the tree."""

    def build_extension(self, ext: Extension) -> None:
        include, sources, macros = blake3_sources()
        if ".S" not in self.compiler.src_extensions:
            self.compiler.src_extensions.append(".S")  # gcc assembles BLAKE3's kernels
        saved = ext.sources, ext.include_dirs, ext.define_macros
        ext.sources = ext.sources + sources
        ext.include_dirs = ext.include_dirs + [include]
        ext.define_macros = ext.define_macros + macros
        try:
            super().build_extension(ext)
        finally:
            ext.sources, ext.include_dirs, ext.define_macros = saved


# Imported for blake3_sources() by the sanitizer test; run by pip and setuptools.
if __name__ == "__main__":
    setup(cmdclass={"build_ext": BuildExt}, ext_modules=[Extension(
        "agent.native._native",
        sources=["agent/native/module.c", "agent/native/chain.c", "agent/native/pump.c",
                 "agent/native/accept.c", "agent/native/opening.c",
                 "agent/native/registry.c"],
        depends=["agent/native/native.h", "bpf/events.h"],
        libraries=["crypto", "isal"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
    )])
