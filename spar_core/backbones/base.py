"""The backbone interface, its errors, weight files and the registry of backbone families.

Every backbone maps a normalised image batch ``(B, 3, H, W)`` with ``H, W`` multiples of the patch size to dense
per-patch features ``(B, H/p, W/p, D)`` in one forward pass. A family (one module each: ``openclip``,
``dinov3txt``) subclasses :class:`Backbone` and registers itself with :func:`register_family`, as timm's model
files register their models; :func:`build_backbone` asks the registry which family owns a name.

Pure model code: no storage, no distribution. A local weights file is read with ``safetensors`` or
``torch.load(weights_only=True)``; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from spar_core.errors import InputError

__all__ = [
    "Backbone",
    "BackboneError",
    "Family",
    "register_family",
    "build_backbone",
    "list_backbones",
    "load_weights_file",
    "check_state_dict",
    "state_dict_sha256",
    "random_weights_id",
    "random_weights_seed",
    "load_checked_weights",
]


class BackboneError(InputError):
    """A backbone could not be built or was given input it cannot process."""


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and bytes, in sorted order (format independent)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(sd[name].shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))  # the tensor's bytes, not a copy of them
    return h.hexdigest()


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from a local ``.safetensors`` or torch file (``weights_only=True``), with a
    ``state_dict`` wrapper and DDP's ``module.`` prefixes removed."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise BackboneError(f"weights file not found: {path}") from e
    except Exception as e:  # corrupt file, pickle refused by weights_only, ...
        raise BackboneError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"weights file {path} does not hold a flat tensor state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def check_state_dict(
    what: str,
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    optional: Sequence[str] = (),
    partial: bool = False,
    error: type[Exception] = BackboneError,
    hint: str = "",
) -> None:
    """Raise ``error`` unless the tensors ``got`` fit a model whose state dict is ``want``: no unknown names, the
    same shapes, and (unless ``partial``) every name of ``want`` present but those in ``optional``.

    The message starts with ``what`` (``"weights file x.pt does not match tiny-clip-64"``) and ends with ``hint``.
    """
    unexpected = sorted(set(got) - set(want))
    missing = [] if partial else sorted(set(want) - set(got) - set(optional))
    if missing or unexpected:
        raise error(
            f"{what}: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}){hint}"
        )
    bad = [k for k in got if tuple(got[k].shape) != tuple(want[k].shape)]
    if bad:
        k = bad[0]
        raise error(
            f"{what}: {k} has shape {tuple(got[k].shape)}, expected {tuple(want[k].shape)} "
            f"({len(bad)} mismatching tensors){hint}"
        )


def random_weights_id(name: str, seed: int) -> str:
    """The weights id of seeded random weights (read back by :func:`random_weights_seed`)."""
    return f"random:{name}:seed{seed}"


def load_checked_weights(model: nn.Module, sd: dict[str, torch.Tensor]) -> str:
    """Copy ``sd`` (checked with :func:`check_state_dict` first) into ``model``; returns the weights id of the
    result, the content hash of its state dict. ``copy_`` casts dtypes; bit-exact for same-dtype files."""
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k in sd:
                t.copy_(sd[k])
    return "sha256:" + state_dict_sha256(model.state_dict())


def random_weights_seed(weights_id: str) -> int | None:
    """The seed ``k`` of seeded random weights from their weights id ``random:<name>:seed<k>`` (None otherwise)."""
    m = re.fullmatch(r"random:.*:seed(\d+)", weights_id or "")
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------------------
# the interface
# ---------------------------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A CLIP-like model exposing dense features, text embeddings and block-wise freezing.

    Attributes: ``name``, ``pretrained``, ``weights_id``, ``readout``, ``patch_size``, ``dim``, ``native_size``,
    ``num_blocks``, ``mean``/``std`` (normalisation, from the model family), ``quick_gelu`` (activation).
    """

    readout: str = ""
    open_clip_name: str | None = None  # the open_clip model name it was built from; None for other models
    patch_size: int
    dim: int
    native_size: int

    def __init__(
        self,
        model: nn.Module,
        name: str,
        pretrained: str | None,
        weights_id: str,
        mean_std: tuple[Sequence[float], Sequence[float]],
        quick_gelu: bool = False,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.weights_id = weights_id
        self.quick_gelu = quick_gelu
        self._tokenizer: Callable | None = None
        mean, std = mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # -- to be provided by a family ------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (N, D), not normalised."""
        raise NotImplementedError

    # -- public interface ----------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`BackboneError` unless ``x`` is (B, 3, H, W) with H, W multiples of the patch size."""
        if x.ndim != 4:
            raise BackboneError(f"expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise BackboneError(f"expected 3 colour channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise BackboneError(f"image size {h}x{w} is not a positive multiple of the patch size {p}")

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features of one forward pass: (B, 3, H, W) -> (B, H/p, W/p, D), not normalised."""
        self.check_input(x)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self._dense(x, gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # so DDP wraps ``dense``
        return self.dense(x)

    def normalize(self, img_u8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float, scaled to [0, 1] and normalised with the model's mean/std."""
        if img_u8.ndim != 4 or img_u8.shape[-1] != 3:
            raise BackboneError(f"expected uint8 images (B, H, W, 3), got shape {tuple(img_u8.shape)}")
        x = img_u8.permute(0, 3, 1, 2).to(self.mean.device, torch.float32) / 255.0  # (B, 3, H, W)
        x = (x - self.mean) / self.std
        return x.to(self._param_dtype())

    def set_trainable(self, last_k: int | str) -> list[str]:
        """Freeze everything, then unfreeze the last ``k`` blocks (0: none).

        ``"all"`` (SPAR-ALL) unfreezes every parameter the dense readout depends on: the whole image tower, less
        what the readout bypasses (the attention pool's query for SigLIP). The text tower stays frozen: the
        reference marks it trainable too, but it never receives a gradient there, so it never changes; leaving it
        frozen keeps DDP free of unused parameters and checkpoints free of 100s of MB of unchanged text weights.
        Returns the names of the trainable parameters.
        """
        if last_k == "all":
            for n, p in self.named_parameters():
                p.requires_grad_(self._used_by_readout(n))
            return [n for n, p in self.named_parameters() if p.requires_grad]
        if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 0:
            raise BackboneError(f"trainable blocks must be an int >= 0 or 'all', got {last_k!r}")
        if last_k > self.num_blocks:
            raise BackboneError(f"cannot train the last {last_k} blocks: {self.name} has {self.num_blocks}")
        for p in self.parameters():
            p.requires_grad_(False)
        for blk in list(self.blocks)[self.num_blocks - last_k :]:
            for p in blk.parameters():
                p.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def _used_by_readout(self, param_name: str) -> bool:
        """Whether the dense readout depends on this parameter (``named_parameters`` name)."""
        return param_name.startswith("model.visual.")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that currently require grad, by their ``state_dict`` names (detached)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a subset of parameters by name; every given name must exist with the same shape."""
        own = dict(self.named_parameters())
        unknown = sorted(set(sd) - set(own))
        if unknown:
            raise BackboneError(f"weights for {self.name} name unknown parameters: {unknown[:5]}")
        with torch.no_grad():
            for n, t in sd.items():
                if own[n].shape != t.shape:
                    raise BackboneError(f"parameter {n}: shape {tuple(t.shape)} != {tuple(own[n].shape)}")
                own[n].copy_(t.to(own[n].dtype))

    def precast_for_autocast(self, dtype: torch.dtype) -> Backbone:
        """Cast once, in place, the weights autocast would cast on every call (Linear/Conv weights and biases and
        ``nn.MultiheadAttention``'s packed input projection) to ``dtype``.

        Autocast caches casts only for parameters that require grad, so a frozen teacher would otherwise re-cast
        all its weights on every forward. Norms and embeddings stay float32, so under autocast in ``dtype`` the
        outputs are bit-identical. Only for frozen inference under autocast.
        """
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    m.to(dtype)
                elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                    m.in_proj_weight.data = m.in_proj_weight.data.to(dtype)
                    if m.in_proj_bias is not None:
                        m.in_proj_bias.data = m.in_proj_bias.data.to(dtype)
        return self

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


# ---------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A backbone family: which names it owns, how it builds one, and how it lists and describes its names.

    ``build(name, pretrained, seed, quick_gelu)`` returns the backbone on the CPU in float32; the registry freezes
    it and moves it.
    """

    name: str
    owns: Callable[[str], bool]
    build: Callable[[str, str | None, int, bool], Backbone]
    names: Callable[[], list[str]]
    known: str  # how an error message lists the family's names


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add a family to the registry (a family module calls this once, at import)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]
    return family


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, family by family."""
    return [n for f in _FAMILIES for n in f.names()]


def build_backbone(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    quick_gelu: bool = False,
) -> Backbone:
    """Build a named backbone in eval mode with every parameter frozen.

    Args:
        name: a name some registered family owns (:func:`list_backbones`; the families' modules say what their
            names mean).
        pretrained: ``None`` (random, seeded by ``seed``) or what the family reads weights from (an open_clip tag,
            a local weights file, ...).
        device, dtype: where and in which precision the parameters live.
        quick_gelu: force QuickGELU on a CLIP tower (same as the ``-quickgelu`` name suffix).
    """
    family = next((f for f in _FAMILIES if f.owns(name)), None)
    if family is None:
        known = "; ".join(f.known for f in _FAMILIES)
        raise BackboneError(f"unknown backbone {name!r}; known: {known}")
    bb = family.build(name, pretrained, seed, quick_gelu)
    bb.set_trainable(0)
    return bb.to(device=device, dtype=dtype).eval()
