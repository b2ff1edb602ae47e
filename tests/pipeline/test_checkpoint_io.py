"""Checkpoints in and out: the authors' SPAR checkpoint layouts -> student; student -> open_clip; SPAR-ALL.

The input files are written here in the key layout the reference code produces (naomikombol/SPAR 0f63ff2):
PyTorch Lightning saves ``LightningSegmentor.state_dict()`` under ``"state_dict"``, i.e. keys
``segmentor.net.model.<open_clip key>`` (LightningSegmentor.segmentor -> VitForSegmentation.net -> wrapper.model),
next to ``epoch``/``global_step``/optimizer and callback state; the released ``.pth`` files are the wrapper's own
state dict, ``model.<open_clip key>``, which eval.py loads with ``strict=True``. Features after import are
compared with an independent MaskCLIP forward (tests/core/test_reference_parity.py) on the source model.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import main
from pipeline.student.format import BACKBONE_FILE, STUDENT_FILE, StudentMeta, load_student, save_student
from pipeline.train.checkpoint_io import CheckpointIOError, export_open_clip, import_checkpoint
from spar_core.backbones import build_backbone
from tests.core.test_reference_parity import ref_maskclip, rel

SIZE = (448, 672)  # non-native, non-square for a 224-native tower


def _spar_trained(name: str = "tiny-clip-224", blocks: tuple[int, ...] = (2, 3), seed: int = 0, **kw):
    """The base backbone with the given blocks perturbed, as SPAR training changes them."""
    bb = build_backbone(name, seed=seed, **kw)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for i in blocks:
            for p in bb.blocks[i].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return bb


def _lightning_ckpt(model: torch.nn.Module, path: Path) -> Path:
    sd = {f"segmentor.net.model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "epoch": 9,
            "global_step": 125000,
            "pytorch-lightning_version": "2.5.3",
            "state_dict": sd,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 10}}}},
            "callbacks": {
                "ModelCheckpoint{'monitor': 'train_loss'}": {"best_model_score": torch.tensor(0.01)}
            },
            "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 2e-5}]}],
            "lr_schedulers": [],
        },
        path,
    )
    return path


def _x() -> torch.Tensor:
    return torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("layout", ["lightning", "wrapper-pth", "open_clip-safetensors"])
def test_import_reference_layouts_reproduce_the_source_model(layout, tmp_path):
    src = _spar_trained()
    if layout == "lightning":
        f = _lightning_ckpt(src.model, tmp_path / "epoch-09-train_loss-0.0100.ckpt")
    elif layout == "wrapper-pth":
        f = tmp_path / "spar_maskclip.pth"
        torch.save({f"model.{k}": v.clone() for k, v in src.model.state_dict().items()}, f)
    else:
        f = tmp_path / "spar.safetensors"
        save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(f))
    res = import_checkpoint(f, "tiny-clip-224", tmp_path / "student", seed=0)
    assert res.max_abs_diff == 0.0 and res.trainable_blocks == 2
    stored = load_file(str(tmp_path / "student" / STUDENT_FILE))
    assert set(stored) == {
        n for n, _ in src.named_parameters() if ".resblocks.2." in n or ".resblocks.3." in n
    }
    info = json.loads((tmp_path / "student" / BACKBONE_FILE).read_text())
    assert info["name"] == "tiny-clip-224" and info["trainable_blocks"] == 2
    student = load_student(tmp_path / "student")
    x = _x()
    with torch.no_grad():
        r = rel(student.dense(x), ref_maskclip(src.model, x))
    print(f"\nimport {layout} 448x672: relative difference to the source model's reference forward {r:.2e}")
    assert r < 1e-5


def test_import_full_model_against_random_base_stores_everything(tmp_path):
    """The released files start from pretrained weights; with no --pretrained the base is random and every
    tensor of the file that differs from it (text tower included) is stored, so features and text embeddings
    match."""
    src = _spar_trained(seed=5, blocks=(0, 3))
    f = _lightning_ckpt(src.model, tmp_path / "a.ckpt")
    res = import_checkpoint(f, "tiny-clip-224", tmp_path / "s", seed=0)
    base = dict(build_backbone("tiny-clip-224", seed=0).model.named_parameters())
    differ = [n for n, p in src.model.named_parameters() if not torch.equal(p, base[n])]
    assert any(n.startswith("text") or n == "token_embedding.weight" for n in differ)
    assert res.trainable_blocks == "all" and res.changed == len(differ) > 40  # LayerNorms init alike: equal
    student = load_student(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(student.encode_text(["a cat"]), src.encode_text(["a cat"]))
        assert rel(student.dense(_x()), ref_maskclip(src.model, _x())) < 1e-5


def test_import_refuses_pickled_objects_and_says_how_to_convert(tmp_path):
    src = build_backbone("tiny-clip-64")
    f = tmp_path / "with-hparams.ckpt"
    torch.save(
        {
            "state_dict": {f"segmentor.net.model.{k}": v for k, v in src.model.state_dict().items()},
            "hyper_parameters": argparse.Namespace(lr=2e-5),
        },
        f,
    )
    with pytest.raises(CheckpointIOError, match=r"argparse\.Namespace.*add_safe_globals") as err:
        import_checkpoint(f, "tiny-clip-64", tmp_path / "s")
    assert not (tmp_path / "s").exists()
    # the printed one-liner works: it re-saves the tensors only, and that file imports
    cmd = re.search(r'python -c "(.*)" and import', str(err.value)).group(1)
    subprocess.run([sys.executable, "-c", cmd], check=True, timeout=120)
    res = import_checkpoint(f.with_suffix(".weights.pth"), "tiny-clip-64", tmp_path / "s")
    assert res.changed == 0 and res.max_abs_diff == 0.0


def test_import_wrong_backbone_and_bad_files(tmp_path):
    src = build_backbone("tiny-clip-64")
    f = tmp_path / "w.pth"
    torch.save({f"model.{k}": v for k, v in src.model.state_dict().items()}, f)
    with pytest.raises(CheckpointIOError, match="does not fit backbone small-clip-224"):
        import_checkpoint(f, "small-clip-224", tmp_path / "s")
    with pytest.raises(CheckpointIOError, match="shape"):
        import_checkpoint(f, "tiny-clip-224", tmp_path / "s")  # same keys, other pos-embed grid
    partial = tmp_path / "p.pth"
    torch.save({f"model.{k}": v for k, v in list(src.model.state_dict().items())[:-3]}, partial)
    with pytest.raises(CheckpointIOError, match="3 tensors missing"):
        import_checkpoint(partial, "tiny-clip-64", tmp_path / "s")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointIOError, match="not a readable torch checkpoint"):
        import_checkpoint(junk, "tiny-clip-64", tmp_path / "s")
    with pytest.raises(CheckpointIOError, match="not found"):
        import_checkpoint(tmp_path / "none.ckpt", "tiny-clip-64", tmp_path / "s")


def test_cli_import_then_export_loads_with_open_clip_alone(tmp_path, capsys):
    src = _spar_trained(quick_gelu=True)
    f = _lightning_ckpt(src.model, tmp_path / "spar.ckpt")
    assert main(["import-checkpoint", str(f), "--backbone", "tiny-clip-224", "--quick-gelu", "--out",
                 str(tmp_path / "student")]) == 0  # fmt: skip
    assert "reloaded exactly" in capsys.readouterr().out
    out = tmp_path / "export" / "spar-student.safetensors"
    assert main(["export", str(tmp_path / "student"), "--format", "open_clip", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "open_clip.create_model('tiny-clip-224-quickgelu'" in printed
    # open_clip alone: register the shipped model config, create the model from the file, forward it by hand
    open_clip.add_model_config(str(tmp_path / "export" / "tiny-clip-224-quickgelu.json"))
    oc = open_clip.create_model("tiny-clip-224-quickgelu", pretrained=str(out)).eval()
    assert isinstance(oc.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    student = load_student(tmp_path / "student")
    x = _x()
    with torch.no_grad():
        r = rel(student.dense(x), ref_maskclip(oc, x, quick=True))
        r_src = rel(ref_maskclip(oc, x, quick=True), ref_maskclip(src.model, x, quick=True))
    print(
        f"\nexport -> open_clip 448x672: project forward vs independent forward on the open_clip model {r:.2e}"
    )
    assert r < 1e-5 and r_src == 0.0


@pytest.mark.slow
@pytest.mark.ci
def test_export_vitb16_loads_in_open_clip(tmp_path):
    bb = _spar_trained("maskclip-vit-b16", blocks=(10, 11))
    bb.set_trainable(2)
    save_student(bb, tmp_path / "s", StudentMeta(2))
    res = export_open_clip(tmp_path / "s", tmp_path / "vitb16.pt")
    assert res.open_clip_name == "ViT-B-16" and res.model_config is None and not res.force_quick_gelu
    oc = open_clip.create_model("ViT-B-16", pretrained=res.file).eval()
    x = _x()
    with torch.no_grad():
        r = rel(load_student(tmp_path / "s").dense(x), ref_maskclip(oc, x))
    print(f"\nViT-B/16 export 448x672: relative difference {r:.2e}")
    assert r < 1e-5


def test_export_refuses_a_missing_student(tmp_path):
    with pytest.raises(CheckpointIOError, match="no such directory"):
        export_open_clip(tmp_path / "nope", tmp_path / "x.pt")


def test_quick_gelu_student_from_a_local_file_round_trips(tmp_path):
    src = build_backbone("tiny-clip-64", seed=8)
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(f))
    bb = build_backbone("tiny-clip-64", pretrained=str(f), quick_gelu=True)
    bb.set_trainable(1)
    student = load_student(save_student(bb, tmp_path / "s", StudentMeta(1)))
    assert student.name == "tiny-clip-64-quickgelu" and student.quick_gelu
    assert student.weights_id == bb.weights_id and student.weights_id.endswith("+quickgelu")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel(student.dense(x), ref_maskclip(src.model, x, quick=True)) < 1e-5
