#!/usr/bin/env bash
# The test suite (everything but tests marked slow; pass `-m slow` or other pytest args to change that).
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec uv run pytest "$@"
