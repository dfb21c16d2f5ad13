"""The relay, opener and chain tests again, against the extension built with
AddressSanitizer and with ThreadSanitizer: a use-after-free, overflow or data
race in the C that the plain build happens to survive fails here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
NATIVE = ROOT / "agent" / "native"
HERE = Path(__file__).resolve().parent

# Load the sanitized build as agent.native._native before anything imports it,
# then run the relay tests in this process.
DRIVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("agent.native._native", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["agent.native._native"] = mod
spec.loader.exec_module(mod)
import pytest
sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", "-p", "no:worm_cleanup", *sys.argv[2:]]))
"""


def blake3_sources() -> tuple[str, list[str], list[tuple[str, str]]]:
    """The BLAKE3 C the extension compiles in, as setup.py finds it."""
    spec = importlib.util.spec_from_file_location("tollgate_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.blake3_sources()


def build(kind: str, out: Path) -> Path:
    so = out / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}"
    b3_include, b3_sources, b3_macros = blake3_sources()
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", f"-fsanitize={kind}",
                    "-fno-omit-frame-pointer", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{b3_include}", *(f"-D{k}={v}" for k, v in b3_macros),
                    *map(str, sorted(NATIVE.glob("*.c"))), *b3_sources, "-lcrypto", "-lisal",
                    "-o", str(so)], check=True)
    return so


@pytest.mark.parametrize("kind,options", [
    ("address", {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"}),
    ("thread", {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"}),
])
def test_relay_tests_pass_under_sanitizer(tmp_path, kind, options):
    so = build(kind, tmp_path)
    runtime = subprocess.run(["gcc", f"-print-file-name=lib{kind[0]}san.so"],
                             capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, **options, "LD_PRELOAD": runtime}
    r = subprocess.run([sys.executable, "-c", DRIVER, str(so), str(HERE / "test_pump.py"),
                        str(HERE / "test_opener.py"), str(HERE / "test_chain.py"),
                        str(HERE / "test_handover.py"), "--basetemp", str(tmp_path / "t")],
                       capture_output=True, text=True, env=env, timeout=900,
                       cwd=str(HERE.parents[2]))
    assert "Sanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert " passed" in r.stdout
