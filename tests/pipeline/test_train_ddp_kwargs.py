"""The DDP keyword that turns off per-forward buffer broadcasts exists under two names across torch versions
(found on a GPU machine with torch 2.11: two Ray Train workers failed with "unexpected keyword argument
'forward_sync_buffers'"). The worker must pass the one the installed DDP accepts."""

from __future__ import annotations

import inspect

import pytest
import torch

from pipeline.train.worker import _no_buffer_sync


def test_buffer_sync_switch_is_accepted_by_the_installed_ddp() -> None:
    kwargs = _no_buffer_sync()
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    assert list(kwargs.values()) == [False]
    assert set(kwargs) <= set(params)


def test_older_torch_gets_broadcast_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    def old_init(
        self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True
    ):  # torch <= 2.11
        raise AssertionError("not called")

    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "__init__", old_init)
    assert _no_buffer_sync() == {"broadcast_buffers": False}
