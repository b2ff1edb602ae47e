"""``spar bench core``'s authors' loop is the same teacher as the project's (so the speed ratio compares equals)."""

from __future__ import annotations

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
