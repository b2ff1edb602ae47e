"""``spar runs``: a terminal comparison table of MLflow runs (params that differ, key metrics)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from pipeline.config import UserError

DEFAULT_METRICS = (
    "mIoU",
    "images_per_s",
    "baseline_mse",
    "student_mse",
    "student_cosine",
    "student_miou_vs_teacher",
    "loss",
    "val_loss",
)
SKIP_PARAM_PREFIXES = ("run_name", "out", "workdir")


class RunsError(UserError):
    """No such experiment / metric."""


def compare_runs(
    experiment: str = "", metric: str = "", workdir: str = "", max_runs: int = 50, all_params: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table.

    Runs of ``experiment`` (default: every experiment), newest first or sorted by ``metric`` (descending).
    Columns: run id, name, status, the params whose values differ across the runs (all with ``all_params``),
    then ``metric`` and the default key metrics present in any run.
    """
    import mlflow

    from pipeline.tracking import tracking_uri

    uri = tracking_uri(workdir or os.environ.get("SPAR_WORKDIR", "work"))
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///") :]):
        raise RunsError(
            f"no MLflow store at {uri[len('sqlite:///') :]} (run a stage first, or pass --workdir)"
        )
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
    df = mlflow.search_runs(experiment_ids=ids, max_results=max_runs, order_by=order)
    if df.empty:
        return ["run"], []
    if metric and f"metrics.{metric}" not in df.columns:
        known = sorted(c[len("metrics.") :] for c in df.columns if c.startswith("metrics."))
        raise RunsError(f"no run has metric {metric!r}; metrics present: {', '.join(known[:30])}")
    params = [
        c
        for c in df.columns
        if c.startswith("params.") and not c[len("params.") :].startswith(SKIP_PARAM_PREFIXES)
    ]
    if not all_params:
        params = [c for c in params if df[c].astype(str).nunique(dropna=False) > 1]
    metrics = [m for m in dict.fromkeys([metric, *DEFAULT_METRICS]) if m and f"metrics.{m}" in df.columns]
    header = ["run", "name", "status"] + [c[len("params.") :] for c in params] + metrics
    rows = []
    for _, r in df.iterrows():
        row = [str(r["run_id"])[:8], str(r.get("tags.mlflow.runName", "") or ""), str(r["status"])]
        row += [_fmt(r[c]) for c in params]
        row += [_fmt(r[f"metrics.{m}"]) for m in metrics]
        rows.append(row)
    return header, rows


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 32 else s[:29] + "..."


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns."""
    if not rows:
        return "no runs found"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _cmd_runs(args: argparse.Namespace) -> int:
    header, rows = compare_runs(
        args.experiment or "", args.metric or "", args.workdir or "", args.max_runs, args.all_params
    )
    print(format_table(header, rows))
    return 0


def add_runs_cli(subparsers) -> None:
    """Register ``runs``."""
    p = subparsers.add_parser("runs", help="compare MLflow runs: differing params and key metrics")
    p.add_argument("--experiment", help="experiment name (default: all)")
    p.add_argument("--metric", help="sort by this metric (descending) and show it")
    p.add_argument(
        "--workdir", help="MLflow store location (default $SPAR_WORKDIR or ./work, as spar distill)"
    )
    p.add_argument("--max-runs", dest="max_runs", type=int, default=50)
    p.add_argument("--all-params", dest="all_params", action="store_true", help="show every param")
    p.set_defaults(func=_cmd_runs)
