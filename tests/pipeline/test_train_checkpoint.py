"""Checkpoints without pickle: student round trips, exact optimizer/RNG restore, corrupt-checkpoint fall-back,
the learning-rate schedule and the CLI config. No Ray cluster needed."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.student.format import STUDENT_FILE, CheckpointError, StudentMeta, load_student, save_student
from pipeline.train.cli import add_cli
from pipeline.train.config import DistillConfig
from pipeline.train.driver import config_from_args
from pipeline.train.state import (
    TrainState,
    capture_rng,
    checkpoint_dir_name,
    load_training_checkpoint,
    restore_rng,
    save_training_checkpoint,
)
from pipeline.train.step import lr_at
from spar_core.backbones import build_backbone
from tests.builders import perturbed_student


def _trained_tiny(seed: int = 0, k: int = 2):
    return perturbed_student(trainable=k, scale=0.01, backbone_seed=seed)


def test_student_round_trip_and_identity(tmp_path: Path) -> None:
    bb = _trained_tiny()
    out = save_student(bb, tmp_path / "student", StudentMeta(2, {"lr": 1.0}, "ab" * 32))
    info = json.loads((out / "backbone.json").read_text())
    assert info["name"] == "tiny-clip-64" and info["weights_id"] == bb.weights_id
    assert info["trainable_blocks"] == 2 and info["cache_fingerprint"] == "ab" * 32
    assert json.loads((out / "config.json").read_text()) == {"lr": 1.0}
    loaded = load_student(out)
    ref = bb.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # the stored tensors are exactly the last two blocks' parameters
    from safetensors.torch import load_file

    names = set(load_file(str(out / STUDENT_FILE)))
    assert names == set(bb.trainable_state_dict()) and all(
        ".resblocks.2." in n or ".resblocks.3." in n for n in names
    )
    with pytest.raises(CheckpointError, match="tiny-clip-224"):
        load_student(out, expect_backbone="tiny-clip-224")


def test_student_of_other_base_weights_is_refused(tmp_path: Path) -> None:
    out = save_student(_trained_tiny(), tmp_path / "s", StudentMeta(2))
    info = json.loads((out / "backbone.json").read_text())
    info["seed"] = 1  # a different random base model: weights_id random:tiny-clip-64:seed1
    (out / "backbone.json").write_text(json.dumps(info))
    (out / "checksums.json").unlink()  # pretend an older checkpoint without checksums
    with pytest.raises(CheckpointError, match="base weights"):
        load_student(out)


def test_corrupt_student_is_reported(tmp_path: Path) -> None:
    out = save_student(_trained_tiny(), tmp_path / "s", StudentMeta(2))
    data = bytearray((out / STUDENT_FILE).read_bytes())
    data[-5] ^= 0xFF
    (out / STUDENT_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_student(out)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_student(tmp_path / "missing")


def _opt_steps(bb, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 64, 64, generator=g)
    tgt = torch.randn(1, 4, 4, bb.dim, generator=g)
    for _ in range(n):
        loss = (bb.dense(x) - tgt).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_training_state_restores_exactly(tmp_path: Path) -> None:
    """3 steps + save + load into fresh objects + 3 steps == 6 uninterrupted steps (bitwise)."""
    ref = build_backbone("tiny-clip-64")
    ref_opt = torch.optim.AdamW(
        [p for p in ref.parameters() if ref.set_trainable(2) and p.requires_grad], lr=1e-3
    )
    _opt_steps(ref, ref_opt, 6, seed=1)

    bb = build_backbone("tiny-clip-64")
    bb.set_trainable(2)
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=1e-3)
    _opt_steps(bb, opt, 3, seed=1)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = TrainState(step=3, epoch=1, batch_in_epoch=2, optimizer=opt.state_dict(), rng=capture_rng(),
                       extra={"note": "x"})  # fmt: skip
    d = save_training_checkpoint(bb, tmp_path / checkpoint_dir_name(3), state, StudentMeta(2))
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    restored, weights = load_training_checkpoint(d)
    assert (restored.step, restored.epoch, restored.batch_in_epoch, restored.extra) == (
        3,
        1,
        2,
        {"note": "x"},
    )
    restore_rng(restored.rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect
    bb2 = build_backbone("tiny-clip-64")
    bb2.set_trainable(2)
    bb2.load_trainable_state_dict(weights)
    opt2 = torch.optim.AdamW([p for p in bb2.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(restored.optimizer)
    _opt_steps(bb2, opt2, 3, seed=1)
    for (n, a), b in zip(ref.state_dict().items(), bb2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # nothing in a checkpoint is a pickle
    for f in d.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"


def test_corrupt_checkpoint_falls_back_to_previous_good(tmp_path: Path) -> None:
    bb = _trained_tiny()
    for step in (2, 4, 6):
        save_training_checkpoint(
            bb, tmp_path / checkpoint_dir_name(step), TrainState(step=step), StudentMeta(2)
        )
    (tmp_path / checkpoint_dir_name(6) / "train_state.json").write_text("{not json")
    (tmp_path / checkpoint_dir_name(4) / "checksums.json").unlink()  # an interrupted write
    from ray.train import Checkpoint

    from pipeline.train.run_dir import restore_latest_good

    logged: list[str] = []
    found = restore_latest_good(Checkpoint(path=str(tmp_path / checkpoint_dir_name(6))), log=logged.append)
    assert found is not None and found[0].step == 2
    assert len(logged) == 2
    assert "step000000006" in logged[0] and "step000000004" in logged[1] and "checksums.json" in logged[1]
    state, _, where = found
    assert state.step == 2 and where.endswith(checkpoint_dir_name(2))


def test_lr_schedule_values() -> None:
    assert [lr_at(s, 1.0, 4, "none", 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_at(s, 2.0, 0, "cosine", 4) for s in range(5)]
    assert cos == pytest.approx([2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 - math.cos(math.pi / 4), 0.0])
    assert lr_at(2, 1.0, 2, "cosine", 6) == pytest.approx(1.0)


def test_cli_flags_override_recipe_and_set(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[distill]\nlr = 0.5\nworkers = 4\nschedule = "cosine"\n')
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["distill", "--images", "I", "--cache", "C", "--config", str(recipe), "--set", "lr=0.25",
         "--set", "trainable_blocks=3", "--workers", "2", "--teacher-online"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.images, cfg.cache, cfg.lr, cfg.workers, cfg.schedule) == ("I", "C", 0.25, 2, "cosine")
    assert cfg.trainable_blocks == 3 and cfg.teacher_online and args.resume is False
    from pipeline.common.config import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        config_from_args(parser.parse_args(["distill", "--set", "precision=fp8"]))
    with pytest.raises(ConfigError, match="epochs"):
        DistillConfig(epochs=0)
    with pytest.raises(ConfigError, match="run_name"):
        DistillConfig(run_name="../escape")
