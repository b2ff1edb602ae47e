"""``loader_workers = "auto"``: checked against a simulation of the DataLoader's in-order round robin (batch j made by
decoder j mod n, each decoder at most ``prefetch`` batches ahead) feeding a trainer, with noisy decode times."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.common.config import ConfigError, load_config
from pipeline.data.loader_sizing import auto_loader_workers, student_step_flops
from pipeline.train.config import DistillConfig

REPO = Path(__file__).resolve().parents[2]


def simulated_wait_fraction(n: int, load_s: float, step_s: float, steps: int = 400, prefetch: int = 4,
                            jitter: float = 0.3, seed: int = 0) -> float:  # fmt: skip
    """Data wait / step time of a trainer fed by ``n`` decoders (0 = one thread, as 1 decoder); decode times vary
    uniformly by +-``jitter``. The first ``2 n prefetch`` steps (start-up) are not counted."""
    rng = np.random.default_rng(seed)
    n = max(1, n)
    free = [0.0] * n  # when each decoder is free
    ready = []
    consumed_at: list[float] = []  # when the trainer took batch j
    t = 0.0
    waits, busy = 0.0, 0.0
    for j in range(steps):
        k = j % n
        start = free[k]
        if j - n * prefetch >= 0:  # a decoder holds at most `prefetch` batches not yet taken
            start = max(start, consumed_at[j - n * prefetch])
        done = start + load_s * rng.uniform(1 - jitter, 1 + jitter)
        free[k] = done
        ready.append(done)
        wait = max(0.0, ready[j] - t)
        t += wait
        consumed_at.append(t)
        t += step_s
        if j >= 2 * n * prefetch:
            waits += wait
            busy += step_s + wait
    return waits / busy


def test_simulation_is_a_real_reference():
    # one decoder at 0.1 s per sample behind a 0.02 s step: the trainer waits ~80% of the time
    assert simulated_wait_fraction(1, 0.1, 0.02) == pytest.approx(0.8, abs=0.03)
    assert simulated_wait_fraction(8, 0.1, 0.02) < 0.05


@pytest.mark.parametrize("load_ms,step_ms", [(100, 18), (106, 18), (71, 5), (30, 400), (150, 60), (90, 89)])
def test_auto_keeps_the_data_wait_under_5_percent(load_ms, step_ms):
    sz = auto_loader_workers(load_ms / 1e3, step_ms / 1e3, max_workers=64)
    assert not sz.capped
    assert simulated_wait_fraction(sz.workers, load_ms / 1e3, step_ms / 1e3) < 0.05
    # and it is needed, not wasteful: fewer decoders than load/step leave the trainer waiting > 5%
    ratio = load_ms / step_ms
    if ratio >= 2:
        assert simulated_wait_fraction(math.floor(ratio) - 1, load_ms / 1e3, step_ms / 1e3) > 0.05
    assert sz.workers <= 1.5 * ratio + 1


def test_auto_caps_and_says_so():
    sz = auto_loader_workers(0.1, 0.01, max_workers=3)
    assert (sz.workers, sz.capped) == (3, True)
    assert (
        auto_loader_workers(0.02, 2.0, max_workers=8).workers == 0
    )  # a CPU step: the decode thread keeps up


def test_step_flops_of_vit_b16_at_paper_size_is_the_issue_arithmetic():
    """ViT-B/16 at 2048x1024 (8,192 tokens): forward through 12 blocks, backward through 2: ~5 TFLOP (the paper
    scale: BENCHMARKS.md)."""
    from spar_core.backbones import build_backbone
    from spar_core.flops import vit_arch, vit_dense_flops

    bb = build_backbone("maskclip-vit-b16")
    fwd = vit_dense_flops(vit_arch(bb), 1024, 2048)["flops"]
    # by hand: N = 8193 tokens (8192 patches + class), d = 768, m = 3072, D = 512; per full block 4Nd^2 + 2N^2 d +
    # 2Ndm multiply-adds; MaskCLIP's last block keeps the value path (2Nd^2 + 2Ndm) and projects N d D; patch
    # embedding 8192 x (3 x 16 x 16) x d
    n, d, m = 8193, 768, 3072
    macs = 11 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m) + 2 * n * d * d + 2 * n * d * m
    macs += n * d * 512 + 8192 * 768 * d
    assert fwd == pytest.approx(2 * macs, rel=0.01)
    assert student_step_flops(fwd, 12, 2) == pytest.approx(5.0e12, rel=0.05)

    from pipeline.train.loader_auto import size_loader

    ims = SimpleNamespace(
        records=[SimpleNamespace(height=1024, width=2048), SimpleNamespace(height=512, width=512)]
    )
    gpu = size_loader(ims, bb, "float16", 2, on_gpu=True, max_workers=32)
    assert gpu.workers >= 5 and simulated_wait_fraction(gpu.workers, gpu.load_s, gpu.step_s) < 0.05
    assert size_loader(ims, bb, "float16", 2, on_gpu=False, max_workers=32).workers == 0


def test_config_accepts_auto_and_the_paper_recipes_use_it():
    assert DistillConfig(loader_workers="auto").loader_workers == "auto"
    with pytest.raises(ConfigError, match="loader_workers"):
        load_config(DistillConfig, None, ["loader_workers=many"], section="distill")
    for name in ("maskclip_vitb16.toml", "maskclip_vitb16_all.toml", "siglip2_vitb16_512.toml",
                 "dinov3txt_vitl16.toml"):  # fmt: skip
        path = REPO / "jobs" / "configs" / name
        assert tomllib.loads(path.read_text())["distill"]["loader_workers"] == "auto"
        assert load_config(DistillConfig, str(path), [], section="distill").loader_workers == "auto"
