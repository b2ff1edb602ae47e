#!/usr/bin/env bash
# The test suite: every test not marked slow, plus the slow ones marked ci (docs/testing.md). Any argument replaces
# that selection: `bash scripts/test.sh -m slow` runs the slow suite, `bash scripts/test.sh tests/core` one folder
# (slow tests included).
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
if [ "$#" -eq 0 ]; then set -- -m "not slow or ci"; fi
exec uv run pytest "$@"
