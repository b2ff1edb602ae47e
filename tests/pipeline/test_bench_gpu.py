"""``spar bench gpu`` (the prepared GPU check) in its CPU mode, and the machinery that keeps its report.

The report must survive a crashing or overrunning section (each section is recorded with its traceback and the
next one runs), its correctness numbers must be measured against an independent fp32 reference (re-implemented
here: a naive one-window-at-a-time teacher), and the pipeline section must report every stage's time.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.bench.gpu import (
    CPU_PLAN,
    REL_TOL,
    SECTIONS,
    UNIT_ROUNDOFF,
    Report,
    check,
    photo,
    run_section,
)
from pipeline.bench.gpu import command as bench_gpu
from pipeline.bench.gpu.checks import project_precompute
from spar_core.backbones import build_backbone
from spar_core.flops import SIGLIP2_B16_512, vit_arch, vit_dense_flops


def _read(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------------------ machinery


def test_sections_record_errors_timeouts_and_partial_results(tmp_path: Path) -> None:
    report = Report(tmp_path, {"mode": "test"})
    seen_on_disk = {}

    def ok(ctx, res, dl):
        res["value"] = 1
        check(res, "fine", True)

    def crash(ctx, res, dl):
        res["measured_before_crash"] = 42.0
        report.save()
        seen_on_disk["crash"] = _read(tmp_path)["sections"]["crash"]
        raise RuntimeError("boom in the middle")

    def overrun(ctx, res, dl):
        res["started"] = True
        time.sleep(10)

    def bad_check(ctx, res, dl):
        check(res, "numbers agree", False, "3 != 4")

    assert run_section(report, "ok", ok, None, 5) == "ok"
    assert run_section(report, "crash", crash, None, 5) == "error"
    t = time.perf_counter()
    assert run_section(report, "overrun", overrun, None, 0.5, hard_s=1.0) == "timeout"
    assert time.perf_counter() - t < 5
    assert run_section(report, "bad_check", bad_check, None, 5) == "checks-failed"

    data = _read(tmp_path)
    s = data["sections"]
    assert s["ok"]["status"] == "ok" and s["ok"]["result"]["value"] == 1
    # while it ran, the crashing section was on disk as running with its partial result
    assert seen_on_disk["crash"]["status"] == "running"
    assert seen_on_disk["crash"]["result"]["measured_before_crash"] == 42.0
    assert s["crash"]["result"]["measured_before_crash"] == 42.0
    assert "RuntimeError: boom in the middle" in s["crash"]["error"]
    assert "Traceback" in s["crash"]["traceback"] and "crash" in s["crash"]["traceback"]
    assert s["overrun"]["result"]["started"] is True and "hard limit" in s["overrun"]["error"]
    assert s["bad_check"]["result"]["checks"] == [{"name": "numbers agree", "ok": False, "detail": "3 != 4"}]
    md = (tmp_path / "report.md").read_text()
    for name in (
        "ok: ok",
        "crash: error",
        "overrun: timeout",
        "bad_check: checks-failed",
        "boom in the middle",
    ):
        assert name in md
    assert "failed checks: bad_check: numbers agree" in md


def test_report_is_valid_json_with_non_finite_numbers(tmp_path: Path) -> None:
    report = Report(tmp_path, {"mode": "test"})
    report.section("x").update(
        status="ok", result={"nan": float("nan"), "inf": np.float32("inf"), "n": np.int64(3)}
    )
    report.save()
    r = _read(tmp_path)["sections"]["x"]["result"]
    assert r == {"nan": "nan", "inf": "inf", "n": 3}


def test_unknown_section_is_an_error(tmp_path: Path, capsys) -> None:
    args = argparse.Namespace(
        out=str(tmp_path), mode="cpu", budget_s=10, sections="environment,nope", workdir=None
    )
    assert bench_gpu.run(args) == 2
    assert "nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ FLOPs and projection


def _counted_flops(bb, h: int, w: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.dense(torch.randn(1, 3, h, w))
    return fc.get_total_flops()


def test_vit_flops_match_torch_flop_counter_non_square() -> None:
    bb = build_backbone("tiny-clip-64")
    for h, w in ((64, 96), (112, 48)):
        assert vit_dense_flops(vit_arch(bb), h, w)["flops"] == _counted_flops(bb, h, w)


@pytest.mark.slow
def test_siglip2_arch_and_flops_match_the_built_model() -> None:
    bb = build_backbone("siglip2-vit-b16-512")
    assert vit_arch(bb) == SIGLIP2_B16_512
    assert vit_dense_flops(SIGLIP2_B16_512, 64, 96)["flops"] == _counted_flops(bb, 64, 96)


def _windows_1d(length: int, crop: int, stride: int) -> int:
    if length <= crop:
        return 1
    n = (length - crop) // stride + 1
    return n + (1 if (length - crop) % stride else 0)


def test_projection_counts_windows_flops_and_bytes() -> None:
    from pipeline.data.augment import augmentation_for
    from pipeline.data.config import IngestConfig

    sizes = [(1500, 2250), (2000, 1500), (1500, 2667), (1500, 2000)] * 5
    got = project_precompute(sizes, 512, 24, window_flops=1e9, dim=768, patch=16)
    cfg = IngestConfig(seed=0)
    wins, tokens = 0, 0
    for i, (h, w) in enumerate(sizes):
        _, _, ch, cw = augmentation_for(f"sa1b-{i}", h, w, cfg)["crop"]
        # the paper's recipe: both sides multiples of 16, short side >= 512, long side <= 2048
        assert ch % 16 == 0 and cw % 16 == 0 and min(ch, cw) >= 512 and max(ch, cw) <= 2048
        wins += _windows_1d(ch, 512, 24) * _windows_1d(cw, 512, 24)
        tokens += (ch // 16) * (cw // 16)
    assert got["windows"] == wins
    assert got["tflops"] == pytest.approx(wins * 1e9 / 1e12)
    assert got["cache_bytes_float16_raw"] == tokens * 768 * 2


# ------------------------------------------------------------------------------------------ CPU mode


def _naive_teacher(bb, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Independent reference: every window alone (fp32), upsampled x2 to 8 px cells, summed, averaged, resized."""
    _, _, h, w = x.shape

    def starts(length: int) -> list[int]:
        if length <= crop:
            return [0]
        s = list(range(0, length - crop + 1, stride))
        return s if s[-1] == length - crop else [*s, length - crop]

    canvas = torch.zeros(1, bb.dim, h // 8, w // 8, dtype=torch.float64)
    count = torch.zeros(1, 1, h // 8, w // 8, dtype=torch.float64)
    for y0 in starts(h):
        for x0 in starts(w):
            with torch.no_grad():
                f = bb.dense(x[:, :, y0 : y0 + crop, x0 : x0 + crop]).permute(
                    0, 3, 1, 2
                )  # (1, D, c/16, c/16)
            f = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False).double()
            canvas[:, :, y0 // 8 : y0 // 8 + f.shape[2], x0 // 8 : x0 // 8 + f.shape[3]] += f
            count[:, :, y0 // 8 : y0 // 8 + f.shape[2], x0 // 8 : x0 // 8 + f.shape[3]] += 1
    out = F.interpolate(
        (canvas / count).float(), size=(h // 16, w // 16), mode="bilinear", align_corners=False
    )
    return out.permute(0, 2, 3, 1)  # (1, H/16, W/16, D)


def _check_correctness(cor: dict) -> None:
    plan = CPU_PLAN
    assert cor["status"] == "ok", cor.get("traceback")
    cases = cor["result"]["cases"]
    assert {(c["backbone"], c["precision"]) for c in cases} == {
        (b, p) for b, _, _ in plan.correctness for p in ("fp32", "bf16", "fp16")
    }
    for c in cases:
        for part in ("teacher", "single"):
            e = c[part]
            assert math.isfinite(e["rel_l2"]) and e["rel_l2"] <= REL_TOL[c["precision"]], c
            assert e["ok"] is True
        # rounding really happened: the comparison is not of a tensor with itself
        if c["precision"] != "fp32":
            assert c["teacher"]["rel_l2"] > 0.1 * UNIT_ROUNDOFF[c["precision"]]
    # the reference is what this test computes independently on the same photo
    name, h, w = plan.correctness[0]
    bb = build_backbone(name)
    x = bb.normalize(torch.from_numpy(photo(h, w))[None])
    mine = _naive_teacher(bb, x, bb.native_size, 24)
    ref = next(c for c in cases if c["backbone"] == name)
    assert ref["shape"] == list(mine.shape)
    assert ref["teacher_ref_norm"] == pytest.approx(float(mine.double().norm()), rel=1e-5)
    with torch.no_grad():
        assert ref["single_ref_norm"] == pytest.approx(float(bb.dense(x).double().norm()), rel=1e-6)


def test_cpu_mode_environment_correctness_projection(tmp_path: Path) -> None:
    args = argparse.Namespace(
        out=str(tmp_path),
        mode="cpu",
        budget_s=300,
        sections="environment,correctness,projection",
        workdir=None,
    )
    assert bench_gpu.run(args) == 0
    data = _read(tmp_path)
    assert list(data["sections"]) == ["environment", "correctness", "projection"]
    env = data["sections"]["environment"]["result"]
    assert env["device"] == "cpu" and env["versions"]["torch"] == torch.__version__
    assert set(env["matmul_tflops"]) == {"bf16", "fp16", "fp32"} and min(env["matmul_tflops"].values()) > 0
    _check_correctness(data["sections"]["correctness"])
    pro = data["sections"]["projection"]["result"]
    assert pro["views"] == 25_000 and pro["windows"] > 25_000 and pro["device_hours"] > 0
    assert "assumed 0.5" in pro["rate_source"]  # no throughput section ran: the stated fallback
    assert (tmp_path / "report.md").read_text().startswith("# spar GPU check (cpu mode)")


@pytest.mark.slow
def test_cpu_mode_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = argparse.Namespace(
        out=str(out), mode="cpu", budget_s=900, sections=",".join(SECTIONS), workdir=None
    )
    rc = bench_gpu.run(args)
    data = _read(out)
    s = data["sections"]
    assert list(s) == list(SECTIONS)
    assert {n: e["status"] for n, e in s.items()} == dict.fromkeys(SECTIONS, "ok"), {
        n: e.get("traceback") for n, e in s.items()
    }
    assert rc == 0
    _check_correctness(s["correctness"])
    thr = s["throughput"]["result"]["backbones"][0]
    assert thr["best"]["teacher_windows_per_s"] > 0 and thr["single_pass"]["teacher_over_single_flops"] > 1
    assert s["projection"]["result"]["rate_source"].startswith("measured fraction")
    pipe = s["pipeline"]["result"]
    assert [r["precision"] for r in pipe["runs"]] == list(CPU_PLAN.pipeline.precisions)
    for r in pipe["runs"]:
        assert set(r["seconds"]) == {"ingest", "precompute", "distill", "eval", "segment"}
        assert all(v > 0 for v in r["seconds"].values())
        assert r["distill"]["worker_device"] == "cpu" and r["distill"]["steps"] == CPU_PLAN.pipeline.steps
        assert r["fidelity"]["images"] == CPU_PLAN.pipeline.heldout_photos
    first, second = pipe["runs"]
    assert first["precompute_tasks"]["computed"] > 0 and first["precompute_tasks"]["devices"] == ["cpu"]
    assert second["precompute_tasks"]["computed"] == 0  # the second run reuses the caches
    assert first["distill"]["autocast_dtype"] == "bfloat16" and second["distill"]["autocast_dtype"] == "none"
    assert all(c["ok"] for c in pipe["checks"]), pipe["checks"]
