"""``spar bench startup``: the fixed cost of each stage, phase by phase, before and after the start-up settings.

Every stage runs as a user runs it: a fresh ``spar <stage>`` process on the demo recipe (tiny-clip-64, the sample
photos), timed from the moment it is spawned to the moment it has exited. Inside, the stages write phase marks
(:mod:`pipeline.common.trace`) to a file, from the driver and from the Ray tasks and Ray Train workers; the phases
are the differences between marks:

* **interpreter and imports**: spawn -> the command's module imported;
* **Ray init**: the local cluster started (``ray.init``);
* **task scheduling** (ingest, precompute): the task pool started -> the first task's body runs (a worker process
  started, its modules imported);
* **Ray Train controller and worker group** (distill): ``trainer.fit()`` -> the training function runs in a worker;
* **model and cache**: the worker builds the student, restores and opens the stream; **first step**;
* **export and registration**: Ray Train's return -> the student exported and registered in MLflow;
* **shutdown**: the command's handler returned -> the process has exited.

The *fixed cost* of ingest and precompute is the wall time minus the time their tasks compute (first task's body
started -> last task done), which is what a larger image set adds to. Distill's headline is the time from the
command to its first optimizer step.

Two sides run interleaved, ``--rounds`` times each, in one run: **before** = the same code with
``SPAR_RAY_DEFAULTS=1`` (Ray Train's defaults on a local cluster and a runtime environment per task, as before the
start-up work), or the code of another checkout (``--before-checkout DIR``: its ``spar``, run with this
interpreter, or with the checkout's own ``.venv`` when it has one; phases where that checkout writes marks, totals
otherwise); **after** = this code as it runs by default. Medians are printed, with the ratio before / after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.bench.measure import cpu_name, scratch_dir, write_json
from pipeline.common.trace import TRACE_ENV, read_marks

STAGES = ("ingest", "precompute", "distill", "demo")
RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.toml"

# (label, start mark, end mark) per stage; "spawn" and "exit" are the bench's own clock readings. For marks made
# by several processes (one per Ray worker) the earliest counts, except "pool_done" / "train_end": the latest.
_Phase = tuple[str, str, str]  # (label, start mark, end mark); "a|b": the first of the marks written
_START: list[_Phase] = [
    ("interpreter and imports", "spawn", "imports"),
    ("Ray init", "ray_init_start", "ray_init_done"),
]
_SHUTDOWN: list[_Phase] = [
    ("shutdown (handler returned -> exit)", "run_end", "exit"),
    ("  of which Ray's shutdown", "run_end", "ray_down"),
    ("  of which the interpreter's exit", "ray_down", "exit"),
]
_TASKS: list[_Phase] = [  # ingest and precompute: one Ray task pool
    *_START,
    ("task scheduling (worker start, imports)", "pool_start", "task_start"),
    ("tasks computing", "task_start", "pool_done"),
    *_SHUTDOWN,
]
_PHASES: dict[str, list[_Phase]] = {
    "ingest": _TASKS,
    "precompute": _TASKS,
    "distill": [
        ("interpreter and imports", "spawn", "imports"),
        ("opening the image set and cache", "distill_start", "inputs_open"),
        ("Ray init", "ray_init_start", "ray_init_done"),
        ("MLflow run", "ray_init_done|inputs_open", "mlflow_run"),  # an in-process run starts no Ray
        ("Ray Train controller and worker group", "fit_start", "worker_start"),  # ~0 in process
        ("model and stream in the worker", "worker_start", "model_ready"),
        ("first step", "model_ready", "first_step"),
        ("training (the steps asked for)", "first_step", "train_end"),
        ("Ray Train teardown", "train_end", "fit_done"),
        ("export and registration", "fit_done", "finish_done"),
        *_SHUTDOWN,
    ],
    "demo": [
        *_START,
        ("1/4 ingest", "stage_ingest", "stage_precompute"),
        ("2/4 precompute", "stage_precompute", "stage_distill"),
        ("3/4 distill", "stage_distill", "stage_eval"),
        ("4/4 eval (+ segmentation)", "stage_eval", "run_end"),
        *_SHUTDOWN,
    ],
}
_LATEST = ("pool_done", "train_end")


@dataclass
class Sample:
    """One timed command: its wall time and its marks as seconds after the spawn."""

    stage: str
    side: str
    wall_s: float
    rc: int
    marks: dict[str, float] = field(default_factory=dict)

    def span(self, start: str, end: str) -> float | None:
        a = next((self.marks[m] for m in start.split("|") if m in self.marks), None)
        b = self.marks.get(end)
        return None if a is None or b is None else b - a

    def headline(self) -> tuple[str, float | None]:
        """The stage's headline figure (see the module docstring)."""
        if self.stage == "distill":
            return "command -> first step", self.marks.get("first_step")
        if self.stage == "demo":
            return "end to end", self.wall_s
        work = self.span("task_start", "pool_done")
        return "fixed cost (wall - tasks computing)", None if work is None else self.wall_s - work


def _marks(path: Path, t_spawn: float, t_exit: float) -> dict[str, float]:
    out: dict[str, float] = {"spawn": 0.0, "exit": t_exit - t_spawn}
    for m in read_marks(str(path)):
        t = m["t"] - t_spawn
        name = m["phase"]
        out[name] = (max if name in _LATEST else min)(out.get(name, t), t)
    return out


SPAR = [sys.executable, "-m", "pipeline.cli"]  # ``spar`` from this code


def _before(checkout: Path | None) -> tuple[list[str], dict[str, str], Path]:
    """The command prefix, extra environment and working folder of the 'before' side: this code with
    ``SPAR_RAY_DEFAULTS=1``, or ``spar`` from ``checkout``."""
    if checkout is None:
        return SPAR, {"SPAR_RAY_DEFAULTS": "1"}, Path.cwd()
    own = checkout / ".venv" / "bin" / "python"  # the checkout's own environment, as it was installed there
    python = str(own) if own.exists() else sys.executable
    return [python, "-m", "pipeline.cli"], {"PYTHONPATH": str(checkout)}, checkout


def _run(stage: str, side: str, argv: list[str], env: dict[str, str], cwd: Path, scratch: Path) -> Sample:
    trace = scratch / f"trace-{stage}-{side}-{time.time_ns()}.jsonl"
    full_env = {**os.environ, **env, TRACE_ENV: str(trace), "TQDM_DISABLE": "1"}
    t0 = time.time()
    proc = subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True)
    t1 = time.time()
    if proc.returncode != 0:
        print(
            f"[bench startup] {stage} ({side}) exited {proc.returncode}:\n{proc.stderr[-2000:]}",
            file=sys.stderr,
        )
    return Sample(stage, side, t1 - t0, proc.returncode, _marks(trace, t0, t1))


@dataclass
class _Inputs:
    raw: Path
    images: Path
    cache: Path


def _prepare(scratch: Path, photos: int) -> _Inputs:
    """Sample photos, their image set and its teacher cache (made once, with this code; not timed)."""
    from pipeline.common.photos import TRAIN_PHOTOS, write_photos

    prep = scratch / "prepared"
    raw = prep / "raw"
    write_photos(raw, TRAIN_PHOTOS[: photos or None])
    inp = _Inputs(raw, prep / "set", prep / "c")  # the cache: the one folder precompute makes in prep / "c"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for stage in ("ingest", "precompute"):
        subprocess.run([*SPAR, *_argv(stage, inp, prep, 0)], env=env, check=True, capture_output=True)
    inp.cache = next(p for p in inp.cache.iterdir() if p.is_dir())
    return inp


def _argv(stage: str, inp: _Inputs, out: Path, steps: int) -> list[str]:
    """The stage's command line (after ``spar``), writing everything under the fresh folder ``out``."""
    recipe = str(RECIPE)
    if stage == "ingest":
        return ["ingest", str(inp.raw), "--out", str(out / "set"), "--config", recipe]
    if stage == "precompute":
        return ["precompute", "--images", str(inp.images), "--config", recipe, "--cache-root", str(out / "c"),
                "--workdir", str(out)]  # fmt: skip
    if stage == "distill":
        return ["distill", "--images", str(inp.images), "--cache", str(inp.cache), "--config", recipe,
                "--set", f"distill.max_steps={steps}", "--set", f"distill.workdir={out}"]  # fmt: skip
    return ["demo", "--workdir", str(out)]


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    # no ratio for a phase that (almost) vanished, e.g. Ray Train's worker group of an in-process run
    return "-" if a is None or b is None or b < 0.05 else f"{a / b:.1f}x"


def _table(stage: str, samples: list[Sample]) -> list[str]:
    """The stage's phases, median seconds per side and the ratio."""
    by = {s: [x for x in samples if x.side == s] for s in ("before", "after")}
    rows = [f"{stage}: median seconds of {len(by['after'])} run(s) per side", f"  {'phase':44s} {'before':>8s} "
            f"{'after':>8s} {'ratio':>7s}"]  # fmt: skip
    head = by["after"][0].headline()[0] if by["after"] else "headline"
    lines = [(head, [x.headline()[1] for x in by["before"]], [x.headline()[1] for x in by["after"]])]
    lines.append(("wall (spawn -> exit)", [x.wall_s for x in by["before"]], [x.wall_s for x in by["after"]]))
    for label, a, b in _PHASES[stage]:
        lines.append((label, [x.span(a, b) for x in by["before"]], [x.span(a, b) for x in by["after"]]))
    for label, bef, aft in lines:
        mb, ma = _median(bef), _median(aft)
        rows.append(f"  {label:44s} {_fmt(mb):>8s} {_fmt(ma):>8s} {_ratio(mb, ma):>7s}")
    return rows


def run(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"spar bench startup: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    checkout = Path(args.before_checkout).resolve() if args.before_checkout else None
    if checkout is not None and not (checkout / "pipeline" / "cli.py").exists():
        raise SystemExit(
            f"spar bench startup: --before-checkout {checkout} is not a checkout of this project"
        )
    samples: list[Sample] = []
    with scratch_dir(args.workdir, "spar-bench-startup-") as scratch:
        inp = _prepare(scratch, args.photos)
        sides = {"before": _before(checkout), "after": (SPAR, {}, Path.cwd())}
        n = 0
        for r in range(args.rounds):
            for stage in stages:
                for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    n += 1
                    out = scratch / f"run-{n}"
                    out.mkdir()
                    pre, env, cwd = sides[side]
                    s = _run(stage, side, [*pre, *_argv(stage, inp, out, args.steps)], env, cwd, scratch)
                    samples.append(s)
                    print(f"[bench startup] round {r + 1} {stage:10s} {side:6s} wall {s.wall_s:6.1f} s "
                          f"(exit {s.rc})", flush=True)  # fmt: skip
                    shutil.rmtree(out, ignore_errors=True)
        report = [f"spar bench startup on {cpu_name()}, {os.cpu_count()} CPUs; before = "
                  f"{'checkout ' + str(checkout) if checkout else 'SPAR_RAY_DEFAULTS=1 (same code)'}"]  # fmt: skip
        for stage in stages:
            report += _table(stage, [s for s in samples if s.stage == stage])
        print("\n".join(report))
        write_json(args.json, [s.__dict__ for s in samples])
    return 0 if all(s.rc == 0 for s in samples) else 1
