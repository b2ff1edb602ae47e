"""``spar bench core``'s authors' loop is the same teacher as the project's (so the speed ratio compares equals)."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench.teacher import authors_loop, naive_teacher_fp32
from spar_core import build_backbone, sliding_window_features


def test_authors_loop_equals_the_naive_reference_and_the_project_teacher_non_square():
    bb = build_backbone("tiny-clip-64")
    x = bb.normalize(
        torch.randint(0, 256, (1, 112, 176, 3), dtype=torch.uint8)
    )  # 23 windows: 3 batches of 10
    ref = naive_teacher_fp32(bb, x, 64, 24)
    got = authors_loop(bb, x, 64, 24, None)
    assert got.shape == ref.shape == (1, 7, 11, bb.dim)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sliding_window_features(bb, x, 64, 24, window_batch=7), ref, rtol=1e-4, atol=1e-5
    )
    amp = authors_loop(bb, x, 64, 24, torch.bfloat16)
    assert float((amp - ref).norm() / ref.norm()) < 3e-2


def test_bench_core_prints_the_ratio(capsys):
    from pipeline.bench.teacher import run
    from pipeline.cli import build_parser

    args = build_parser("bench").parse_args(
        [
            "bench",
            "core",
            "--backbone",
            "tiny-clip-64",
            "--size",
            "64x112",
            "--rounds",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "project vs authors' loop:" in out and "of fp32 matmul" in out


def test_matmul_rate_grows_its_size_only_while_a_product_stays_within_the_budget(monkeypatch):
    """A machine that multiplies at 1 GFLOP/s (bf16 emulated on a CPU without AVX-512) is measured at 256 only; one
    at 200 GFLOP/s reaches the full size. The product times are simulated from the rate; the sizes are the ones
    ``matmul_gflops`` asked to allocate."""
    from pipeline.bench import measure

    sizes: list[int] = []
    real_operands = measure._matmul_operands

    def operands(n, dtype, device):
        sizes.append(n)
        return real_operands(n, dtype, device)

    monkeypatch.setattr(measure, "_matmul_operands", operands)
    for rate, want in ((1.0, [256]), (200.0, [256, 512, 1024, 2048])):
        sizes.clear()
        # one product of a.shape[0]^3 multiply-adds at `rate` GFLOP/s, times the products timed together
        monkeypatch.setattr(
            measure,
            "_timed_matmuls",
            lambda a, b, c, dev, inner, r=rate: inner * 2 * a.shape[0] ** 3 / (r * 1e9),
        )
        got = measure.matmul_gflops(torch.float32, n=2048, seconds=1.0)
        assert sizes == want, (rate, sizes)
        assert got == pytest.approx(rate)
