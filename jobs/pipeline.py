"""Ray Job entry point: `python -m jobs.pipeline ARGS` runs `spar pipeline ARGS` (same options, errors, exit code)."""

from jobs._entry import run

if __name__ == "__main__":
    raise SystemExit(run("pipeline"))
