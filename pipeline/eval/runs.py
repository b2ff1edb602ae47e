"""``spar runs``: the training runs of an experiment side by side in the terminal.

By default: one row per training (distill) run, with its final loss and the headline metrics its evaluations
copied onto it (fidelity, speed, benchmarks), and only the parameters that differ among the rows, trimmed to fit
a 120-column terminal. ``--wide`` shows every differing parameter and metric whatever the width; ``--all`` lists
every run (evaluations and precomputes too) with all its parameters.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from typing import TYPE_CHECKING, Any

import mlflow

from pipeline.common.errors import UserError
from pipeline.common.tracking import tracking_uri
from pipeline.eval.config import RUNS_WIDTH as WIDTH

if TYPE_CHECKING:
    import pandas as pd

# (metric, column label): the headline metrics, in this order, when any row has them
HEADLINE = (
    ("loss", "loss"),
    ("fidelity/student_mse", "student_mse"),
    ("fidelity/baseline_mse", "baseline_mse"),
    ("fidelity/mse_ratio", "mse_ratio"),
    ("fidelity/student_cosine", "cosine"),
    ("fidelity/student_miou_vs_teacher", "mIoU_vs_teacher"),
)
# metrics shown in --all mode (evaluation runs log these names on themselves)
DEFAULT_METRICS = (
    "mIoU",
    "images_per_s",
    "baseline_mse",
    "student_mse",
    "student_cosine",
    "student_miou_vs_teacher",
    "loss",
)
# parameters that name places or runs, not settings: never a "difference" worth a column
SKIP_PARAMS = ("run_name", "out", "workdir", "storage_path", "marker_dir", "parent_run")


class RunsError(UserError):
    """No such experiment / metric."""


def compare_runs(
    experiment: str = "",
    metric: str = "",
    workdir: str = "",
    max_runs: int = 50,
    all_params: bool = False,
    all_runs: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (most important columns first).

    Training runs of ``experiment`` (default: every experiment), newest first or sorted by ``metric``
    (descending). Columns: run id, name, the parameters whose values differ across the rows (every one with
    ``all_params``), then ``metric`` and the headline metrics present in any row. ``all_runs``: every run.
    A table too wide for the terminal loses columns from the right (:func:`fit_columns`).
    """
    uri = tracking_uri(workdir or os.environ.get("SPAR_WORKDIR", "work"))
    db = uri.removeprefix("sqlite:///")
    if db != uri and not os.path.isfile(db):
        raise RunsError(f"no MLflow store at {db} (run a stage first, or pass --workdir)")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise RunsError(f"no MLflow experiment named {experiment!r}; known: {', '.join(names) or 'none'}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return ["run"], []
    order = [f"metrics.`{metric}` DESC"] if metric else ["attributes.start_time DESC"]
    flt = "" if all_runs else "tags.`spar.stage` = 'distill'"
    df = mlflow.search_runs(experiment_ids=ids, filter_string=flt, max_results=max_runs, order_by=order)
    if df.empty:
        return ["run"], []
    if metric and f"metrics.{metric}" not in df.columns:
        known = sorted(c[len("metrics.") :] for c in df.columns if c.startswith("metrics."))
        raise RunsError(f"no run has metric {metric!r}; metrics present: {', '.join(known[:30])}")
    params = [c for c in df.columns if c.startswith("params.") and c[len("params.") :] not in SKIP_PARAMS]
    if not all_params:
        params = [c for c in params if df[c].astype(str).nunique(dropna=False) > 1]
    metrics = _metric_columns(df, metric, all_runs)
    header = ["run", "name"] + [c[len("params.") :] for c in params] + [label for _, label in metrics]
    rows = []
    for _, r in df.iterrows():
        row = [str(r["run_id"])[:8], _tail(str(r.get("tags.mlflow.runName", "") or ""), 20)]
        row += [_fmt(r[c]) for c in params]
        row += [_fmt(r[f"metrics.{m}"]) for m, _ in metrics]
        rows.append(row)
    return header, rows


def _metric_columns(df: pd.DataFrame, metric: str, all_runs: bool) -> list[tuple[str, str]]:
    """(metric, label) columns present in ``df``: ``metric``, the headline ones, benchmark mIoUs, the speed ratio."""
    present = {c[len("metrics.") :] for c in df.columns if c.startswith("metrics.")}
    cols: list[tuple[str, str]] = [(metric, metric)] if metric else []
    if all_runs:
        cols += [(m, m) for m in DEFAULT_METRICS if m in present]
    else:
        cols += [(m, label) for m, label in HEADLINE if m in present]
        cols += sorted((m, m.replace("/", "_")) for m in present if m.endswith("/mIoU"))
        speed = sorted(m for m in present if m.startswith("speed/slowdown_"))
        if speed:
            cols.append((speed[0], "teacher_x_" + speed[0].rsplit("_", 2)[-2]))
    seen: set[str] = set()
    return [(m, lab) for m, lab in cols if not (m in seen or seen.add(m))]


def _tail(s: str, limit: int) -> str:
    """The end of a long name (generated run names differ in their time stamp, at the end)."""
    return s if len(s) <= limit else "…" + s[-(limit - 1) :]


def _fmt(v: Any, limit: int = 24) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    if len(s) > limit and "/" in s:  # a path: its end says the most
        return "…" + s[-(limit - 1) :]
    return s if len(s) <= limit else s[: limit - 1] + "…"


def fit_columns(
    header: list[str], rows: list[list[str]], width: int
) -> tuple[list[str], list[list[str]], int]:
    """Drop columns from the right until the table fits ``width`` characters; returns how many were dropped."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else []
    keep = len(header)
    while keep > 2 and sum(widths[:keep]) + 2 * (keep - 1) > width:
        keep -= 1
    return header[:keep], [r[:keep] for r in rows], len(header) - keep


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns."""
    if not rows:
        return "no runs found"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """``spar runs``: the comparison table, fitted to the terminal unless ``--wide`` or ``--all``; with
    ``--resend FILE``, instead, the entries a run kept locally while its tracking server was unreachable."""
    if getattr(args, "resend", None):
        _resend(args.resend)
        return 0
    header, rows = compare_runs(
        args.experiment or "",
        args.metric or "",
        args.workdir or "",
        args.max_runs,
        all_params=args.all,
        all_runs=args.all,
    )
    dropped = 0
    if not (args.wide or args.all):
        width = (
            min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns) if args.width is None else args.width
        )
        header, rows, dropped = fit_columns(header, rows, width)
    print(format_table(header, rows))
    if dropped:
        print(f"({dropped} more column(s): spar runs --wide)")
    return 0


def _resend(path: str) -> None:
    """Send a spool file of :mod:`pipeline.common.tracking_queue` to its run (in order), then remove it."""
    from pipeline.common.tracking_queue import resend

    if not os.path.isfile(path):
        raise UserError(f"--resend {path}: no such file")
    n = resend(path)
    print(f"re-sent {n} entries from {path}")
