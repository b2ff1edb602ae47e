#!/usr/bin/env bash
# The test suite: every test not marked slow, plus the slow ones marked ci (docs/testing.md), in one pytest process.
# SPAR_TEST_WORKERS=N runs it on N pytest-xdist workers instead (one group per module, the longest first:
# tests/conftest.py); on the 2-core CI machine two workers gained 3 % (the suite is CPU-bound there), so one process
# is the default. Any argument replaces that selection: `bash scripts/test.sh -m slow` runs the slow suite,
# `bash scripts/test.sh tests/core` one folder (slow tests included).
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
if [ "$#" -eq 0 ]; then
    set -- -m "not slow or ci"
    workers="${SPAR_TEST_WORKERS:-1}"
    if [ "$workers" != "1" ] && [ "$workers" != "0" ]; then
        set -- "$@" -n "$workers" --dist loadgroup --no-loadscope-reorder
    fi
fi
exec uv run pytest "$@"
