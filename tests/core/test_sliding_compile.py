"""The teacher's optional torch.compile path: same features as the eager teacher, and an eager fallback."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench.teacher import naive_teacher_fp32
from spar_core import build_backbone, sliding_window_features
from spar_core import sliding as sliding_mod


def _inputs():
    bb = build_backbone("tiny-clip-64")
    x = bb.normalize(torch.randint(0, 256, (1, 112, 176, 3), dtype=torch.uint8))  # 23 windows, non-square
    return bb, x


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    bb, x = _inputs()

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        got = sliding_window_features(bb, x, 64, 24, window_batch=8, compile=True)
    torch.testing.assert_close(got, naive_teacher_fp32(bb, x, 64, 24), rtol=1e-4, atol=1e-5)
    assert sliding_mod.window_forward(bb, True) == bb.dense  # remembered: no second attempt


def test_compiled_function_failing_at_run_time_falls_back(monkeypatch):
    bb, x = _inputs()

    def compiled_that_fails(fn, **k):
        def run(_):
            raise RuntimeError("inductor: gcc missing")

        return run

    monkeypatch.setattr(torch, "compile", compiled_that_fails)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        got = sliding_window_features(bb, x, 64, 24, window_batch=8, compile=True)
    torch.testing.assert_close(got, naive_teacher_fp32(bb, x, 64, 24), rtol=1e-4, atol=1e-5)


def test_env_switch(monkeypatch):
    from pipeline.common.precision import COMPILE_ENV, compile_requested

    bb, _ = _inputs()
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert not compile_requested()
    assert sliding_mod.window_forward(bb, compile_requested()) == bb.dense
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_requested()
    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)
    assert sliding_mod.window_forward(bb, compile_requested()) != bb.dense


@pytest.mark.slow
def test_compiled_teacher_equals_the_naive_reference():
    """Real inductor compilation (minutes on a loaded 2-core CPU): equal to the naive fp32 teacher."""
    bb, x = _inputs()
    got = sliding_window_features(bb, x, 64, 24, window_batch=8, compile=True)
    assert not bb.__dict__["_spar_compiled"].get("failed")
    torch.testing.assert_close(got, naive_teacher_fp32(bb, x, 64, 24), rtol=1e-4, atol=1e-5)
