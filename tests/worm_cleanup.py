"""pytest plugin (loaded with -p from pyproject): finished store segments are
made immutable (WORM), which pytest's own clean-up of old temporary
directories cannot remove; clear the flag under this run's base directory
when the session ends. Not a conftest.py: the integration folders import
their own conftest modules by that name."""

from __future__ import annotations

import subprocess


def pytest_sessionfinish(session, exitstatus) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        base = factory.getbasetemp()
    except Exception:  # no test asked for a temporary directory
        return
    subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True)
