"""`spar submit`: run a pipeline stage as a Ray Job on a (remote) Ray cluster.

The job's entrypoint is `python -m jobs.<stage> <args...>` (see `jobs/`), i.e. exactly the `spar <stage>` command
run on the cluster. The project directory is uploaded as the job's `working_dir` (virtual environments, git data
and local work directories excluded); MLflow and storage settings present in the submitting shell are passed to
the job as environment variables. With token authentication on (the default here: it stays on), the client sends
the cluster's token, found the way Ray itself finds it: `--token-file`, else `RAY_AUTH_TOKEN`, else
`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`.

    spar submit --address http://127.0.0.1:8265 ingest --src photos/ --out /shared/spar/images
    spar submit --address http://HEAD:8265 pipeline --config jobs/configs/maskclip_vitb16.toml --no-wait
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.common.errors import UserError

# submit's stage name -> module under jobs/ (each one forwards to the `spar` subcommand of the same stage)
STAGES: dict[str, str] = {s: s for s in ("ingest", "precompute", "distill", "evaluate", "pipeline")}
STAGES["eval"] = "evaluate"

# Environment passed from the submitting shell to the job when set (tracking server and storage credentials).
PASSTHROUGH_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_EXPERIMENT_NAME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "HF_HUB_OFFLINE",
)
PASSTHROUGH_PREFIXES: tuple[str, ...] = ("SPAR_",)

# gitignore-style patterns (relative to the working dir) never uploaded with the job.
UPLOAD_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    ".git/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "workdir/",
    "workdirs/",
    "work/",
    "spar-work/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.egg-info/",
    "dist/",
    "build/",
)

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError):
    """The job could not be submitted or followed (cluster unreachable, auth refused, bad arguments)."""


# ---------------------------------------------------------------------------------------------- building blocks


def build_entrypoint(stage: str, stage_args: Sequence[str]) -> str:
    """Shell command the cluster runs: `python -m jobs.<stage> <args>` with every argument shell-quoted (`eval` is
    an alias of `evaluate`)."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}: choose one of {', '.join(sorted(STAGES))}")
    return shlex.join(["python", "-m", f"jobs.{STAGES[stage]}", *stage_args])


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """`["KEY=VAL", ...]` -> dict; a pair without `=` or with an invalid name is an error naming it."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if (
            not sep
            or not key
            or not (key[0].isalpha() or key[0] == "_")
            or not key.replace("_", "").isalnum()
        ):
            raise SubmitError(
                f"--env {pair!r}: expected KEY=VALUE with KEY a valid environment variable name"
            )
        env[key] = value
    return env


def passthrough_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The MLflow / storage / SPAR_* variables set in `environ` (default: this process) to forward to the job."""
    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in environ.items()
        if v != "" and (k in PASSTHROUGH_ENV or k.startswith(PASSTHROUGH_PREFIXES))
    }


def build_runtime_env(
    working_dir: str | os.PathLike[str],
    extra_env: Mapping[str, str] | None = None,
    pass_env: bool = True,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Ray runtime_env for a stage job: upload `working_dir` (minus excludes), forward env, disable the uv hook.

    `extra_env` (from `--env`) overrides forwarded values. `RAY_ENABLE_UV_RUN_RUNTIME_ENV=0` keeps Ray from
    re-wrapping the job's workers in `uv run` (the cluster's environment is already installed).
    """
    from pipeline.common.tracking import git_commit

    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {str(working_dir)!r}: not a directory")
    if not (wd / "jobs").is_dir() or not (wd / "pipeline").is_dir():
        raise SubmitError(
            f"--working-dir {str(wd)!r}: not the spar project (no jobs/ and pipeline/ in it); "
            "run from the project root or pass --working-dir"
        )
    env: dict[str, str] = passthrough_env(environ) if pass_env else {}
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env.setdefault("SPAR_GIT_COMMIT", git_commit(wd))  # the upload has no .git: lineage comes from here
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    return {"working_dir": str(wd), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env}


def read_auth_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray auth token the way Ray's own clients find it, or None when there is none.

    Precedence: `token_file` (explicit), `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`.
    An explicitly named file that is missing or empty is an error (never silently unauthenticated).
    """
    environ = os.environ if environ is None else environ
    explicit = token_file or environ.get("RAY_AUTH_TOKEN_PATH")
    if token_file is None and environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if explicit:
        path = Path(explicit).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise SubmitError(f"Ray auth token file {str(path)!r}: cannot read it ({e.strerror})") from e
        if not token:
            raise SubmitError(f"Ray auth token file {str(path)!r} is empty")
        return token
    default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    return (default.read_text().strip() or None) if default.is_file() else None


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Dashboard (Jobs API) address: `--address`, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    environ = os.environ if environ is None else environ
    addr = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not addr:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API)"
        )
    if "://" not in addr:
        raise SubmitError(
            f"--address {addr!r}: expected the dashboard URL, e.g. http://127.0.0.1:8265 "
            "(not the GCS address host:6379)"
        )
    return addr.rstrip("/")


# ------------------------------------------------------------------------------------------------ the client


def make_client(address: str, token_file: str | None = None) -> Any:
    """A `JobSubmissionClient` for `address` carrying `Authorization: Bearer <token>` when a token is available
    (`RAY_AUTH_MODE=token` requires one); clear errors for refusal/unreachable."""
    from ray.job_submission import JobSubmissionClient

    token = read_auth_token(token_file)
    if token is None and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        raise SubmitError(
            "RAY_AUTH_MODE=token but no Ray auth token found: pass --token-file, set RAY_AUTH_TOKEN or "
            "RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token "
            "(on the head node: `ray get-auth-token`)"
        )
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # ConnectionError / RuntimeError from the version probe
        raise SubmitError(_explain_client_error(address, e, bool(headers))) from e


def _explain_client_error(address: str, e: BaseException, had_token: bool) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = str(e)
    if "401" in text or "Unauthorized" in text:
        hint = "the cluster requires a token" if not had_token else "the token was not accepted"
        return (
            f"Ray cluster at {address} refused the request (401 Unauthorized: {hint}); see `spar submit -h`"
        )
    if "403" in text or "Forbidden" in text:
        return f"Ray cluster at {address} refused the token (403 Forbidden: wrong token for this cluster)"
    return f"cannot reach the Ray Jobs API at {address}: {msg}"


def follow_logs(client: Any, job_id: str, write: Callable[[str], Any], poll_s: float = 1.0) -> None:
    """Stream the job's logs to `write` until it ends: websocket tail, falling back to polling on failure."""
    written = 0

    async def _tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            written += len(chunk)

    try:
        asyncio.run(_tail())
        return
    except Exception as e:  # websocket refused by a proxy, connection dropped, ...
        write(f"[spar submit] log stream interrupted ({type(e).__name__}: {e}); polling instead\n")
    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        if len(logs) > written:
            write(logs[written:])
            written = len(logs)
        if _state_name(status) in TERMINAL_STATES:
            return
        time.sleep(poll_s)


def _state_name(status: Any) -> str:
    s = str(getattr(status, "value", status))
    return s.rsplit(".", 1)[-1].upper()


def wait_for_job(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 0.25) -> str:
    """Poll until the job is SUCCEEDED/FAILED/STOPPED (or `timeout_s` passes: SubmitError); returns the state."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = _state_name(client.get_job_status(job_id))
        if state in TERMINAL_STATES:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {state} after {timeout_s:.0f} s (it keeps running)")
        time.sleep(poll_s)


def job_exit_code(state: str, driver_exit_code: int | None) -> int:
    """The exit status `spar submit` reports: 0 only for SUCCEEDED; a failed job's own code when known."""
    if state == "SUCCEEDED":
        return 0
    if isinstance(driver_exit_code, int) and 0 < driver_exit_code < 256:
        return driver_exit_code
    return 1


def _failure_note(info: Any, state: str) -> str:
    if state == "SUCCEEDED":
        return ""
    message = (getattr(info, "message", None) or "").strip()
    first = message.splitlines()[0].split(", last available logs")[0] if message else ""
    return f": {first}" if first else ""


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------------ CLI


def split_trailing_options(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate submit's own options (those of :func:`_add_submit_options`, which may also follow the stage's
    arguments before a `--`, as in `spar submit --address A ingest --src x --out y --working-dir . --no-wait`)
    from the stage's arguments after the stage name.

    Everything after a literal `--` belongs to the stage verbatim. Returns (submit_opts, stage_args).
    """
    takes_value = {o: a.nargs != 0 for a in _trailing_parser()._actions for o in a.option_strings}
    submit_opts: list[str] = []
    stage_args: list[str] = []
    items = iter(rest)
    for tok in items:
        if tok == "--":
            stage_args.extend(items)
            break
        name, has_value = tok.split("=", 1)[0], "=" in tok
        if name in takes_value and takes_value[name] == has_value:  # a flag, or --option=value
            submit_opts.append(tok)
        elif takes_value.get(name):
            value = next(items, None)
            if value is None:
                raise SubmitError(f"{tok} needs a value")
            submit_opts.extend([tok, value])
        else:
            stage_args.append(tok)
    return submit_opts, stage_args


def _add_submit_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument(
        "--working-dir", default=d("."), help="project directory uploaded with the job (default: .)"
    )
    p.add_argument(
        "--env", action="append", default=d([]), metavar="KEY=VAL", help="extra environment for the job"
    )
    p.add_argument("--token-file", default=d(None), help="Ray auth token file (default: Ray's own lookup)")
    p.add_argument("--submission-id", default=d(None), help="job id to use (default: generated)")
    p.add_argument("--num-gpus", type=float, default=d(None), help="GPUs reserved for the job's driver")
    p.add_argument("--timeout", type=float, default=d(None), help="stop waiting after this many seconds")
    p.add_argument("--no-wait", action="store_true", default=d(False), help="return right after submission")
    p.add_argument(
        "--no-pass-env",
        action="store_true",
        default=d(False),
        help="do not forward MLFLOW_*/AWS_*/SPAR_* variables from this shell",
    )


def _trailing_parser() -> argparse.ArgumentParser:
    """The submit options that may follow the stage's arguments, without defaults (unset ones stay unset)."""
    extra = argparse.ArgumentParser(prog="spar submit", add_help=False)
    _add_submit_options(extra, defaults=False)
    return extra


def add_cli(subparsers: Any) -> None:
    """Register `spar submit`."""
    p = subparsers.add_parser(
        "submit",
        help="run a stage as a Ray Job on a cluster",
        description=(
            "Submit `python -m jobs.<stage> ARGS` to a Ray cluster's Jobs API, follow its logs and exit with "
            "its status (0 only when SUCCEEDED). Submit options may come before the stage or after its "
            "arguments; use `--` to pass a same-named option to the stage. Paths in stage arguments are "
            "resolved on the cluster: use shared storage or s3:// URLs, not paths on this machine."
        ),
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)",
    )
    _add_submit_options(p, defaults=True)
    p.add_argument("stage", choices=sorted(STAGES), help="stage to run (jobs/<stage>.py)")
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="arguments of `spar <stage>`")
    p.set_defaults(handler="pipeline.cluster.submit:run_cli")


def run_cli(args: argparse.Namespace) -> int:
    """`spar submit`: submit `python -m jobs.<stage> <stage_args>` as a Ray Job and follow its logs; 0 only when it
    SUCCEEDED. With `--no-wait` returns 0 right after submission (the job id is printed)."""
    trailing, stage_args = split_trailing_options(args.stage_args)
    if trailing:
        parsed, unknown = _trailing_parser().parse_known_args(trailing)
        if unknown:
            raise SubmitError(f"unrecognised submit options: {' '.join(unknown)}")
        for key, value in vars(parsed).items():
            if key == "env":
                args.env = [*args.env, *value]
            else:
                setattr(args, key, value)
    env = parse_env_pairs(args.env)
    logging.getLogger("ray").setLevel(logging.WARNING)  # packaging chatter; warnings and errors still show
    addr = resolve_address(args.address)
    entrypoint = build_entrypoint(args.stage, stage_args)
    runtime_env = build_runtime_env(args.working_dir, env, pass_env=not args.no_pass_env)
    client = make_client(addr, args.token_file)
    gpus = {"entrypoint_num_gpus": args.num_gpus} if args.num_gpus else {}
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.submission_id,
            metadata={"spar_stage": args.stage},
            **gpus,
        )
    except Exception as e:
        raise SubmitError(f"submitting {entrypoint!r} to {addr} failed: {e}") from e
    _out(f"[spar submit] job {job_id} submitted to {addr}: {entrypoint}\n")
    if args.no_wait:
        _out(f"[spar submit] follow it with: ray job logs --address {addr} --follow {job_id}\n")
        return 0
    try:
        follow_logs(client, job_id, _out)
        state = wait_for_job(client, job_id, timeout_s=args.timeout)
    except KeyboardInterrupt:
        _out(f"\n[spar submit] stopped following; job {job_id} keeps running (ray job stop {job_id})\n")
        return 130
    info = client.get_job_info(job_id)
    _out(f"[spar submit] job {job_id} {state}{_failure_note(info, state)}\n")
    return job_exit_code(state, getattr(info, "driver_exit_code", None))
