"""``spar bench gpu``, the command: sets the environment Ray and tqdm read when imported, then imports the
sections (:mod:`.checks`) and runs them in order under their time limits, keeping the report
(:mod:`pipeline.bench.gpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.bench.gpu import (
    CPU_PLAN,
    GPU_PLAN,
    SECTIONS,
    Context,
    Report,
    Terminated,
    run_section,
    say,
    summary_lines,
)


def run(args: argparse.Namespace) -> int:
    """``spar bench gpu``: the sections in order; returns 0 when every section finished and every check passed,
    1 otherwise, 2 on a usage error."""
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    os.environ.setdefault("TQDM_DISABLE", "1")
    from pipeline.bench.measure import scratch_dir  # after the environment is set (see the module docstring)

    cuda = torch.cuda.is_available()
    mode = args.mode if args.mode != "auto" else ("gpu" if cuda else "cpu")
    if mode == "gpu" and not cuda:
        print("spar bench gpu: --mode gpu but CUDA is not available (use --mode cpu)", file=sys.stderr)
        return 2
    names = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        print(f"spar bench gpu: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out, plan = Path(args.out).resolve(), GPU_PLAN if mode == "gpu" else CPU_PLAN
    with scratch_dir(args.workdir, "spar-gpu-check-") as work:
        work = work.resolve()
        work.mkdir(parents=True, exist_ok=True)
        meta = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
                "budget_s": args.budget_s, "sections": names, "plan": asdict(plan), "workdir": str(work)}  # fmt: skip
        report = Report(out, meta)
        ctx = Context(plan, "cuda" if mode == "gpu" else "cpu", report, work)
        _run_sections(report, ctx, names, args.budget_s)
    print("\n" + "=" * 100)
    print(f"spar GPU check ({mode} mode) in {meta['total_seconds']} s; report: {out / 'report.md'}")
    print("\n".join("  " + line for line in summary_lines(report.data)))
    print("=" * 100, flush=True)
    return 0 if all(e.get("status") == "ok" for e in report.data["sections"].values()) else 1


def _run_sections(report: Report, ctx: Context, names: list[str], budget_s: float) -> None:
    """Each section with its share of what is left (time a section did not use passes on to the next ones)."""
    import ray  # the heavy part of the check, once the environment is set

    from pipeline.bench.gpu.checks import SECTION_FNS
    from pipeline.common.tasks import shutdown_ray

    t0, old_term, ray_was_up = time.perf_counter(), signal.getsignal(signal.SIGTERM), ray.is_initialized()
    say(f"mode {ctx.plan.mode}, sections {', '.join(names)}, budget {budget_s:.0f} s, report in {report.out}")
    try:
        for i, name in enumerate(names):
            left = budget_s - (time.perf_counter() - t0)
            if left <= 5:
                report.section(name).update(status="skipped", error="the total budget was spent")
                report.save()
                continue
            shares = [ctx.plan.budgets.get(n, 10) for n in names[i:]]
            budget = left * shares[0] / sum(shares)
            hard = min(budget * 1.6 + 10, left + 15)
            run_section(report, name, SECTION_FNS[name], ctx, budget, hard_s=hard)
    except (Terminated, KeyboardInterrupt):
        say("stopped by a signal; the report holds everything measured so far")
    finally:
        report.data["meta"]["total_seconds"] = round(time.perf_counter() - t0, 1)
        report.save()
        if not ray_was_up:  # stop only the local cluster this run started
            with contextlib.suppress(Exception):  # best effort at exit
                shutdown_ray()
        signal.signal(signal.SIGTERM, old_term)
