"""SPAR checkpoints in and out: the authors' released checkpoints -> a student; a student -> an open_clip model.

``spar import-checkpoint FILE --backbone NAME --out DIR`` reads what the reference code (naomikombol/SPAR 0f63ff2)
writes and its ``eval.py`` reads:

* a PyTorch Lightning ``.ckpt``: ``{"state_dict": {"segmentor.net.model.<open_clip key>": tensor, ...}, "epoch",
  ...}`` (``LightningSegmentor.segmentor`` -> ``VitForSegmentation.net`` -> the wrapper's ``model``, the open_clip
  model); ``eval.py`` keeps the keys under ``segmentor.net.`` and loads them into the wrapper strictly;
* a plain ``.pth`` state dict of the wrapper: ``{"model.<open_clip key>": tensor}`` (the released files);
* for convenience an open_clip state dict (``<open_clip key>``), a ``module.`` (DDP) prefix, or ``.safetensors``.

The file is read with ``torch.load(weights_only=True)`` (or safetensors); a file holding Python objects that
refuses is reported with the object named and a one-line conversion. The result is a student checkpoint
(:mod:`pipeline.student.format` layout): base backbone ``NAME`` built from ``--pretrained`` (the weights the authors
started from, e.g. ``laion2b_s34b_b88k`` for MaskCLIP; default: random seeded), and ``student.safetensors``
holding every parameter that differs from that base, so ``eval``/``segment``/``embed`` load it as any student.
The import is checked by reloading the student and comparing every tensor with the file.

``spar export STUDENT --format open_clip --out FILE`` writes the student's full open_clip state dict (safetensors
for ``*.safetensors``, else a tensors-only ``torch.save``) that ``open_clip.create_model(name, pretrained=FILE)``
loads directly; for the tiny test backbones it also writes the open_clip model config ``<name>.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.common.errors import UserError
from pipeline.common.storage import sha256_of
from pipeline.student.format import CheckpointError, StudentMeta, load_student, save_student
from spar_core.backbones import (
    QUICKGELU_SUFFIX,
    Backbone,
    build_backbone,
    check_state_dict,
    tiny_model_config,
)

LIGHTNING_PREFIX = "segmentor.net."  # LightningSegmentor.segmentor (VitForSegmentation).net (the wrapper)
WRAPPER_PREFIX = "model."  # OpenCLIPWrapper / SigLIP2Wrapper .model (the open_clip model)


class CheckpointIOError(UserError, ValueError):
    """A checkpoint to import or a student to export is unreadable, unsafe, or does not fit the backbone."""


# ------------------------------------------------------------------------------------------------ reading


def _refused_message(path: Path, err: Exception) -> str:
    found = re.search(r"Unsupported global:\s*GLOBAL\s+([\w.]+)", str(err))
    out = path.with_suffix(".weights.pth")
    if not found:
        return (
            f"{path}: holds Python objects that torch.load(weights_only=True) refuses to unpickle; allowlist the "
            "classes it names with torch.serialization.add_safe_globals (only for a file you trust), re-save "
            f"its 'state_dict' with torch.save to {out} and import that file"
        )
    module, _, name = found.group(1).rpartition(".")
    return (
        f"{path}: holds a Python object ({found.group(1)}) that torch.load(weights_only=True) refuses to unpickle "
        "(Lightning checkpoints often store hyper_parameters or callback objects). Only if you trust the file, "
        "keep its tensors with that one class allowed (repeat for any further class it names): "
        f'python -c "import torch, importlib; torch.serialization.add_safe_globals([getattr(importlib.'
        f"import_module('{module}'), '{name}')]); c = torch.load('{path}', map_location='cpu', weights_only=True); "
        f"torch.save(c.get('state_dict', c), '{out}')\" and import {out.name}"
    )


def read_tensor_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint safely: (flat tensor dict, info about the container). Never unpickles objects."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointIOError(f"checkpoint file {p}: not found")
    if p.suffix == ".safetensors":
        try:
            obj: Any = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise CheckpointIOError(f"{p}: not a readable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle refusals and corrupt files alike
            if "Unsupported global" in str(e):  # a pickled object, refused by the weights-only unpickler
                raise CheckpointIOError(_refused_message(p, e)) from None
            raise CheckpointIOError(
                f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})"
            ) from None
    info: dict[str, Any] = {"container": "state_dict"}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info = {"container": "lightning", "epoch": obj.get("epoch"), "global_step": obj.get("global_step")}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointIOError(f"{p}: holds {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointIOError(f"{p}: entries {bad[:3]} are not tensors; expected a flat state dict")
    return obj, info


def to_open_clip_keys(
    sd: dict[str, torch.Tensor], where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """Strip the reference's prefixes: (open_clip state dict, layout name).

    Lightning keys under ``segmentor.net.`` are kept (and others dropped), as the reference's eval.py does.
    """
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith(LIGHTNING_PREFIX) for k in sd):
        sd = {k[len(LIGHTNING_PREFIX) :]: v for k, v in sd.items() if k.startswith(LIGHTNING_PREFIX)}
        layout = "lightning segmentor.net.model."
    else:
        layout = "wrapper model."
    if all(k.startswith(WRAPPER_PREFIX) for k in sd):
        return {k[len(WRAPPER_PREFIX) :]: v for k, v in sd.items()}, layout
    if layout.startswith("lightning"):
        odd = sorted(k for k in sd if not k.startswith(WRAPPER_PREFIX))[:3]
        raise CheckpointIOError(
            f"{where}: keys under {LIGHTNING_PREFIX!r} outside the wrapper's model: {odd}"
        )
    return sd, "open_clip"


# ------------------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportResult:
    """What ``import_checkpoint`` wrote."""

    out_dir: str
    layout: str  # "lightning segmentor.net.model." | "wrapper model." | "open_clip"
    changed: int  # parameters that differ from the base weights (stored in student.safetensors)
    trainable_blocks: int | str  # the smallest k whose last k blocks hold every change, or "all"
    max_abs_diff: float  # reloaded student vs the file, over every tensor (0.0 = exact)


def _changed_params(bb: Backbone, sd: dict[str, torch.Tensor], src: str) -> list[str]:
    """Check ``sd`` (open_clip keys) fits ``bb.model`` exactly and return the parameter names that differ."""
    own = bb.model.state_dict()
    what = f"{src} does not fit backbone {bb.name}"
    check_state_dict(what, sd, own, error=CheckpointIOError, hint="; is --backbone right?")
    params = {n for n, _ in bb.model.named_parameters()}
    for k in set(own) - params:  # persistent buffers cannot be stored in a student: they must match the base
        if not torch.equal(sd[k].to(own[k].dtype), own[k]):
            raise CheckpointIOError(f"{src}: buffer {k} differs from the base backbone's")
    return sorted(k for k in params if not torch.equal(sd[k].to(own[k].dtype), own[k]))


def _blocks_needed(bb: Backbone, changed: list[str]) -> int | str:
    """The smallest ``k`` such that every changed parameter lies in the last ``k`` blocks, else ``"all"``."""
    if not changed:
        return 0
    block_of = {id(p): i for i, blk in enumerate(bb.blocks) for p in blk.parameters()}
    named = dict(bb.model.named_parameters())
    blocks = [block_of.get(id(named[k]), -1) for k in changed]  # -1: outside the blocks
    return "all" if min(blocks) < 0 else bb.num_blocks - min(blocks)


def import_checkpoint(
    path: str | Path,
    backbone: str,
    out_dir: str | Path,
    *,
    pretrained: str | None = None,
    seed: int = 0,
    quick_gelu: bool = False,
) -> ImportResult:
    """Turn an authors' SPAR checkpoint into a student checkpoint directory (see the module docstring)."""
    p = Path(path)
    raw, info = read_tensor_file(p)
    sd, layout = to_open_clip_keys(raw, where=str(p))
    bb = build_backbone(backbone, pretrained, seed=seed, quick_gelu=quick_gelu)
    changed = _changed_params(bb, sd, str(p))
    named = dict(bb.model.named_parameters())
    with torch.no_grad():
        for k in changed:
            named[k].copy_(sd[k].to(named[k].dtype))
            named[k].requires_grad_(True)  # what save_student stores
    blocks = _blocks_needed(bb, changed)
    config = {
        "imported_from": {
            "file": p.name,
            "sha256": sha256_of(str(p)),
            "layout": layout,
            **{k: v for k, v in info.items() if k != "container" and v is not None},
        }
    }
    save_student(bb, out_dir, StudentMeta(blocks, config, seed=seed))
    back = load_student(out_dir)
    mine = back.model.state_dict()
    diff = max(
        (float((mine[k].float() - sd[k].float()).abs().max()) for k in sd if sd[k].numel()), default=0.0
    )
    if diff != 0.0:
        raise CheckpointIOError(f"import of {p} does not reload exactly (max |diff| {diff}); please report")
    return ImportResult(str(out_dir), layout, len(changed), blocks, diff)


# ------------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    """What ``export_open_clip`` wrote and how open_clip loads it."""

    file: str
    open_clip_name: str  # the name to pass to open_clip.create_model
    model_config: str | None  # an open_clip model-config JSON to register first (tiny backbones), else None
    force_quick_gelu: bool  # pass force_quick_gelu=True (QuickGELU tower whose open_clip name lacks it)

    def python(self) -> str:
        """The lines that load the export with open_clip alone."""
        lines = ["import open_clip"]
        if self.model_config:
            lines.append(f"open_clip.add_model_config({self.model_config!r})")
        qg = ", force_quick_gelu=True" if self.force_quick_gelu else ""
        lines.append(f"model = open_clip.create_model({self.open_clip_name!r}, pretrained={self.file!r}{qg})")
        return "\n".join(lines)


def export_open_clip(student_dir: str | Path, out: str | Path) -> ExportResult:
    """Write the student as a full open_clip state dict (see the module docstring)."""
    import open_clip

    try:
        bb = load_student(student_dir)
    except CheckpointError as e:
        raise CheckpointIOError(str(e)) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in bb.model.state_dict().items()}
    if out.suffix == ".safetensors":
        save_file(sd, str(out), metadata={"format": "open_clip", "spar_backbone": bb.name})
    else:
        torch.save(sd, out)
    config_path, force_qg = None, False
    if bb.open_clip_name is None:  # tiny test backbone: ship its open_clip model config
        name = bb.name
        config_path = str(out.parent / f"{name}.json")
        Path(config_path).write_text(json.dumps(tiny_model_config(name, bb.quick_gelu), indent=2) + "\n")
    else:
        name = bb.open_clip_name
        if bb.quick_gelu and not name.endswith(QUICKGELU_SUFFIX):
            if name + QUICKGELU_SUFFIX in open_clip.list_models():
                name += QUICKGELU_SUFFIX
            else:
                force_qg = True
    return ExportResult(str(out), name, config_path, force_qg)


# ---------------------------------------------------------------------------------------------------- CLI


def run_import_cli(args: argparse.Namespace) -> int:
    """``spar import-checkpoint`` (arguments: :mod:`pipeline.train.cli`)."""
    res = import_checkpoint(
        args.file,
        args.backbone,
        args.out,
        pretrained=args.pretrained or None,
        seed=args.seed,
        quick_gelu=args.quick_gelu,
    )
    print(
        f"spar import-checkpoint: {args.file} ({res.layout}) -> student {res.out_dir}: {res.changed} parameters "
        f"differ from the base weights (trainable blocks: {res.trainable_blocks}); reloaded exactly"
    )
    return 0


def run_export_cli(args: argparse.Namespace) -> int:
    """``spar export`` (arguments: :mod:`pipeline.train.cli`)."""
    res = export_open_clip(args.student, args.out)
    print(f"spar export: wrote {res.file}; load it with open_clip alone:\n{res.python()}")
    return 0
