"""Ray Job entry point: `python -m jobs.evaluate ARGS` runs `spar eval ARGS` (same options, errors, exit code)."""

from jobs._entry import run

if __name__ == "__main__":
    raise SystemExit(run("eval"))
