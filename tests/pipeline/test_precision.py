"""pipeline.common.precision: one vocabulary and one resolver for every stage; ``auto`` is the device's fastest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.common import precision as prec
from pipeline.common.precision import PrecisionError, autocast, cache_mode, canonical, resolve


@pytest.fixture
def cpu_rule(monkeypatch):
    """Set SPAR_CPU_BF16 (None: unset) with the per-process cache cleared before and after."""

    def set_(value: str | None) -> None:
        prec.cpu_prefers_bf16.cache_clear()
        if value is None:
            monkeypatch.delenv(prec.CPU_BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(prec.CPU_BF16_ENV, value)

    yield set_
    prec.cpu_prefers_bf16.cache_clear()


def test_every_vocabulary_maps_to_one_name():
    table = {"auto": "auto", "fp32": "fp32", "none": "fp32", "float32": "fp32", "BF16": "bf16",
             "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}  # fmt: skip
    for given, want in table.items():
        assert canonical(given) == want
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'"):
        canonical("fp8")
    assert issubclass(PrecisionError, ValueError)


def test_explicit_precisions_are_kept_and_cache_names_are_the_historical_ones():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve(name, "cpu") == name
    assert [cache_mode(p) for p in ("fp32", "bf16", "fp16", "none")] == ["none", "bf16", "fp16", "none"]
    with pytest.raises(PrecisionError, match="resolved"):
        cache_mode("auto")


def test_auto_on_cpu_follows_the_amx_rule_and_its_override(cpu_rule):
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    cpu_rule(None)
    if flags:  # the independent reading of the CPU's flags
        assert prec.cpu_has_amx_bf16() == ("amx_bf16" in flags)
        assert prec.cpu_has_avx512_bf16() == ("avx512_bf16" in flags)
    if prec.cpu_has_amx_bf16():
        want = "bf16"
    elif prec.cpu_has_avx512_bf16():  # AVX512-BF16 without AMX: the measured probe decides
        want = "bf16" if prec.cpu_bf16_speedup() > prec.PROBE_MIN_SPEEDUP else "fp32"
    else:
        want = "fp32"
    assert resolve("auto", "cpu") == want
    cpu_rule("1")
    assert resolve("auto", torch.device("cpu")) == "bf16"
    cpu_rule("0")
    assert resolve("auto", "cpu") == "fp32"


def test_measured_probe_is_a_positive_ratio_and_cached():
    r = prec.cpu_bf16_speedup()
    assert r > 0 and prec.cpu_bf16_speedup() == r  # second call: the cached value, no re-measurement


def test_autocast_context_follows_the_resolved_dtype(cpu_rule):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    cpu_rule("1")
    with autocast("cpu", "auto"):
        assert lin(x).dtype == torch.bfloat16
    cpu_rule("0")
    with autocast("cpu", "auto"):
        assert lin(x).dtype == torch.float32


def test_train_uses_the_resolver(cpu_rule):
    from pipeline.common.precision import autocast_dtype
    from pipeline.train.config import DistillError
    from pipeline.train.step import step_precision

    def resolve_precision(name, device):  # (autocast dtype, GradScaler?) as the step runner derives them
        p = step_precision(name, device)
        return autocast_dtype(p), p == "fp16"

    cpu = torch.device("cpu")
    cpu_rule("1")
    assert resolve_precision("auto", cpu) == (torch.bfloat16, False)
    cpu_rule("0")
    assert resolve_precision("auto", cpu) == (None, False)
    with pytest.raises(DistillError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)


def test_inference_names_go_through_the_resolver():
    from pipeline.common.precision import autocast_dtype

    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp32") is None
    assert autocast_dtype("none") is None


def test_precompute_records_the_resolved_precision_in_the_cache_spec(cpu_rule):
    from pipeline.cache.config import PrecomputeConfig
    from pipeline.cache.precompute import _resolved_autocast

    assert PrecomputeConfig().autocast == "auto"
    cpu = dict(images="x", device="cpu")
    cpu_rule("1")
    assert _resolved_autocast(PrecomputeConfig(**cpu)) == "bf16"
    cpu_rule("0")
    assert _resolved_autocast(PrecomputeConfig(**cpu)) == "none"  # the cache spec's name for fp32
    assert _resolved_autocast(PrecomputeConfig(**cpu, autocast="bf16")) == "bf16"  # forced


def test_auto_for_cuda_planned_on_a_driver_without_cuda(monkeypatch):
    """A CPU-only driver planning GPU tasks (precompute device = "cuda") records bf16, not the CPU's choice."""
    import torch

    from pipeline.common.precision import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve("auto", "cuda") == "fp16"
