#!/usr/bin/env bash
# The test suite: every test not marked slow, plus the slow ones marked ci (docs/testing.md), on two pytest-xdist
# workers (SPAR_TEST_WORKERS=N for another count, 0 for one process). Any argument replaces that selection and
# runs in one process: `bash scripts/test.sh -m slow` runs the slow suite, `bash scripts/test.sh tests/core` one
# folder (slow tests included).
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
if [ "$#" -eq 0 ]; then
    set -- -m "not slow or ci"
    workers="${SPAR_TEST_WORKERS:-2}"
    if [ "$workers" != "0" ]; then
        # one group per module (tests/conftest.py), the longest first, in that order
        set -- "$@" -n "$workers" --dist loadgroup --no-loadscope-reorder
    fi
fi
exec uv run pytest "$@"
