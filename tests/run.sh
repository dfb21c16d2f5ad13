#!/bin/sh
# The whole test suite, as CI runs it. pytest's "no tests collected" (exit 5)
# is a failure here, never a pass.
set -u
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
[ $rc -eq 5 ] && { echo "run.sh: no tests were collected" >&2; exit 1; }
exit $rc
