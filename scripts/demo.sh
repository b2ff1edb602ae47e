#!/usr/bin/env bash
# The main job: the whole SPAR pipeline on real sample photographs, on this machine (see README).
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
exec uv run spar demo "$@"
