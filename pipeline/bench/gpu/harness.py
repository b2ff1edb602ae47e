"""The GPU check's report: ``report.json`` (everything measured) and ``report.md`` (a readable summary, then each
section's checks, error and result), both rewritten atomically whenever a section records something, so a crash or
a kill keeps what was measured so far. Also the two ways a section records things: :func:`check` and :func:`say`.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.gpu.plan import REL_TOL
from pipeline.common.storage import write_bytes_atomic


class Report:
    """The report: ``report.json`` (everything) and ``report.md`` (readable), rewritten atomically on save."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        """Write both files (temp file + rename: a kill mid-write leaves the previous version)."""
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _write(self.out / "report.json", json.dumps(jsonable(self.data), indent=1))
        try:
            md = render_markdown(self.data)
        except Exception:  # noqa: BLE001 - the JSON is what counts; say why the Markdown is missing
            md = "# GPU check\n\nMarkdown rendering failed:\n\n```\n" + traceback.format_exc() + "```\n"
        _write(self.out / "report.md", md)


def _write(path: Path, text: str) -> None:
    write_bytes_atomic(str(path), text.encode())


def jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("nan", "inf"), unknown objects their str()."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return str(x)


def say(msg: str) -> None:
    """A progress line (flushed: the device's log shows how far a run got)."""
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check(result: dict[str, Any], name: str, ok: bool, detail: str = "") -> bool:
    """Record a pass/fail check in a section's result."""
    result.setdefault("checks", []).append({"name": name, "ok": bool(ok), "detail": detail})
    return bool(ok)


# ----------------------------------------------------------------------------------------------- markdown


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The headline numbers, one line each (printed at the end and at the top of report.md)."""
    sec = data.get("sections", {})
    lines = [
        f"{name}: {e.get('status')} ({e.get('seconds', '-')} s)"
        + (f" — {e['error']}" if e.get("error") else "")
        for name, e in sec.items()
    ]

    def result(name: str) -> dict[str, Any]:
        return sec.get(name, {}).get("result", {})

    thr = result("throughput")
    lines += _environment_lines(result("environment")) + _correctness_lines(result("correctness"))
    lines += _throughput_lines(thr) + _projection_lines(result("projection"))
    lines += [
        f"pipeline distill {r['precision']}: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r.get("seconds", {}).items())
        for r in result("pipeline").get("runs", [])
    ]
    lines += [
        f"target {t['name']}: {'met' if t['met'] else 'NOT met'} ({t['value']:.2f})"
        for t in thr.get("targets", [])
    ]
    skipped = [f"{n}: {s}" for n, e in sec.items() for s in e.get("result", {}).get("skipped", [])]
    if skipped:
        lines.append("skipped: " + "; ".join(skipped))
    failed = [
        f"{n}: {c['name']}"
        for n, e in sec.items()
        for c in e.get("result", {}).get("checks", [])
        if not c["ok"]
    ]
    lines.append("failed checks: " + ("; ".join(failed) if failed else "none"))
    return lines


def _environment_lines(env: dict[str, Any]) -> list[str]:
    if not env:
        return []
    gpu = env.get("gpu", {})
    return [
        f"device {gpu.get('name', env.get('device'))}, torch {env.get('versions', {}).get('torch')}, "
        f"CUDA {env.get('versions', {}).get('cuda')}; matmul TFLOP/s "
        + ", ".join(f"{k} {v:.3g}" for k, v in env.get("matmul_tflops", {}).items())
    ]


def _correctness_lines(cor: dict[str, Any]) -> list[str]:
    return [
        f"correctness {c['backbone']} {c['precision']}: teacher rel {c['teacher']['rel_l2']:.2e}, single rel "
        f"{c['single']['rel_l2']:.2e} (tol {REL_TOL[c['precision']]:.1e}) "
        + ("ok" if c["teacher"]["ok"] and c["single"]["ok"] else "FAIL")
        for c in cor.get("cases", [])
    ]


def _throughput_lines(thr: dict[str, Any]) -> list[str]:
    lines = []
    for b in thr.get("backbones", []):
        best, sp = b.get("best"), b.get("single_pass")
        if best:
            f = best.get("teacher_fraction_of_matmul")
            lines.append(
                f"throughput {b['backbone']} crop {b['crop']}: {best['teacher_windows_per_s']:.0f} win/s at batch "
                f"{best['window_batch']}, {best['teacher_tflops']:.1f} TFLOP/s"
                + (f" = {f:.2f} of matmul" if f is not None else "")
                + f", fold overhead {best['fold_overhead']:.2f}, peak {best.get('teacher_peak_gib')} GiB"
            )
        if sp:
            lines.append(
                f"  single pass {thr['image'][0]}x{thr['image'][1]}: {sp['seconds'] * 1e3:.1f} ms, teacher/single "
                f"{sp['teacher_over_single_seconds']:.1f}x time ({sp['teacher_over_single_flops']:.1f}x FLOPs)"
            )
    return lines


def _projection_lines(pro: dict[str, Any]) -> list[str]:
    if pro.get("device_hours") is None:
        return []
    return [
        f"projection 25k SA-1B views, SigLIP2 crop 512 stride 24: {pro['windows']:.3g} windows, "
        f"{pro['tflops']:.3g} TFLOP, {pro['device_hours']:.1f} {pro.get('device')}-hours "
        f"({pro['rate_source']}), cache {pro['cache_bytes_float16_raw'] / 1e9:.0f} GB float16 raw"
    ]


def render_markdown(data: dict[str, Any]) -> str:
    """report.md: summary, then per section its status, checks, error and full result."""
    meta = data.get("meta", {})
    out = [
        f"# spar GPU check ({meta.get('mode')} mode)",
        "",
        f"Started {meta.get('started')}, updated {meta.get('updated')}.",
        "",
    ]
    out += ["## Summary", ""] + [f"- {line}" for line in summary_lines(data)] + [""]
    for name, e in data.get("sections", {}).items():
        out += [
            f"## {name}: {e.get('status')}",
            "",
            f"{e.get('seconds', '-')} s (budget {e.get('budget_s', '-')} s)",
            "",
        ]
        checks = e.get("result", {}).get("checks", [])
        if checks:
            out += ["| check | ok | detail |", "|---|---|---|"]
            out += [f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in checks]
            out.append("")
        if e.get("traceback"):
            out += ["```", e["traceback"].rstrip(), "```", ""]
        body = {k: v for k, v in e.get("result", {}).items() if k != "checks"}
        out += [
            "<details><summary>result</summary>",
            "",
            "```json",
            json.dumps(jsonable(body), indent=1)[:60000],
            "```",
            "</details>",
            "",
        ]
    return "\n".join(out)
