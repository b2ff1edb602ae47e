"""SPAR-ALL end to end: ``trainable_blocks = "all"`` from the recipe/CLI, a real 2-worker DDP distillation, a
checkpoint holding the whole image tower, and eval/segment/embed loading it (they all go through load_student)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.common.config import ConfigError
from pipeline.student.format import STUDENT_FILE, StudentMeta, load_student, save_student
from pipeline.train.cli import add_cli
from pipeline.train.config import DistillConfig
from pipeline.train.driver import config_from_args, distill
from spar_core.backbones import build_backbone
from tests.builders import perturbed_student
from tests.conftest import load_photo
from tests.core.test_reference_parity import ref_maskclip, rel


def _parse(*argv: str) -> DistillConfig:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    return config_from_args(parser.parse_args(["distill", *argv]))


def test_trainable_blocks_all_from_set_and_recipe(tmp_path: Path) -> None:
    assert _parse("--set", "distill.trainable_blocks=all").trainable_blocks == "all"
    assert _parse("--set", "trainable_blocks=3").trainable_blocks == 3
    recipe = tmp_path / "r.toml"
    recipe.write_text('[distill]\ntrainable_blocks = "all"\n')
    assert _parse("--config", str(recipe)).trainable_blocks == "all"
    with pytest.raises(ConfigError, match="trainable_blocks"):
        _parse("--set", "trainable_blocks=some")
    with pytest.raises(ConfigError, match="trainable_blocks"):
        DistillConfig(trainable_blocks=-1)


@pytest.fixture(scope="module")
def data(paired) -> dict[str, str]:
    return paired


@pytest.mark.slow  # ~2.5 min on the 2-core machine (image set + cache + Ray Train start-up)
def test_spar_all_distill_checkpoint_holds_the_image_tower_and_loads_everywhere(data, tmp_path: Path) -> None:
    cfg = DistillConfig(
        images=data["images"], cache=data["cache"], workdir=str(tmp_path / "wd"), workers=2, max_steps=2,
        checkpoint_every=2, lr=1e-3, seed=1, trainable_blocks="all",
    )  # fmt: skip
    res = distill(cfg)
    assert res.completed and res.steps == 2
    stored = load_file(str(Path(res.checkpoint_dir) / STUDENT_FILE))
    base = build_backbone("tiny-clip-64", seed=0)
    visual = {n for n, _ in base.named_parameters() if n.startswith("model.visual.")}
    assert set(stored) == visual  # the whole image tower, no text tower
    own = dict(base.named_parameters())
    for name in ("model.visual.conv1.weight", "model.visual.positional_embedding",
                 "model.visual.transformer.resblocks.0.attn.in_proj_weight", "model.visual.proj"):  # fmt: skip
        assert not torch.equal(stored[name], own[name]), f"{name} was not trained"
    # independent reload: the base open_clip model with the file's tensors put in by plain load_state_dict
    full = {k.removeprefix("model."): v for k, v in base.state_dict().items()}
    full.update({k.removeprefix("model."): v for k, v in stored.items()})
    base.model.load_state_dict(full, strict=True)
    student = load_student(res.checkpoint_dir)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        assert rel(student.dense(x), ref_maskclip(base.model, x)) < 1e-5
    # segment and embed take the checkpoint (eval loads students through the same load_student)
    photo = tmp_path / "rocket.png"
    Image.fromarray(load_photo("rocket")).save(photo)
    out = tmp_path / "emb"
    assert main(["embed", str(photo), "--checkpoint", res.checkpoint_dir, "--short-side", "64", "--out",
                 str(out)]) == 0  # fmt: skip
    assert main(["embed", str(photo), "--backbone", "tiny-clip-64", "--short-side", "64", "--out",
                 str(tmp_path / "base")]) == 0  # fmt: skip
    a, b = np.load(out / "rocket.npy"), np.load(tmp_path / "base" / "rocket.npy")
    assert a.shape == b.shape and np.abs(a - b).max() > 1e-3  # the trained tower, not the base
    assert main(["segment", str(photo), "--checkpoint", res.checkpoint_dir, "--classes", "sky;rocket;ground",
                 "--short-side", "64", "--out", str(tmp_path / "seg")]) == 0  # fmt: skip


def test_spar_all_student_checkpoint_round_trip(tmp_path: Path) -> None:
    """Fast companion of the Ray test: a whole-tower student is saved in full and loads exactly."""
    bb = perturbed_student("tiny-clip-224", "all", scale=0.02, seed=3)
    names = [n for n, p in bb.named_parameters() if p.requires_grad]
    src = {k: v.clone() for k, v in bb.model.state_dict().items()}
    out = save_student(bb, tmp_path / "s", StudentMeta("all"))
    assert set(load_file(str(out / STUDENT_FILE))) == set(names)
    ref = build_backbone("tiny-clip-224", seed=0)
    ref.model.load_state_dict(src, strict=True)  # independent: plain open_clip load of the perturbed weights
    student = load_student(out)
    x = torch.randn(1, 3, 448, 672)
    with torch.no_grad():
        assert rel(student.dense(x), ref_maskclip(ref.model, x)) < 1e-5
