"""The open_clip family: CLIP towers (MaskCLIP readout), SigLIP/SigLIP2 towers (pool-bypass readout), tiny
seeded CLIPs for tests.

Every backbone maps a normalised image batch ``(B, 3, H, W)`` with ``H, W`` multiples of the patch size to dense
per-patch features ``(B, H/p, W/p, D)`` in one forward pass, interpolating the pretrained position embeddings
bicubically to the input's patch grid exactly as the authors' reference code does (naomikombol/SPAR 0f63ff2): for
CLIP towers ``F.interpolate(..., scale_factor=((gh + 0.1) / G, (gw + 0.1) / G), mode="bicubic")`` (no antialias,
the class token's embedding kept), for SigLIP2 towers size-based bicubic to ``(gh, gw)``. Normalisation comes from
the model family whatever the weights source (SigLIP: mean = std = 0.5), and OpenAI weights run with QuickGELU.
Two readouts:

* ``maskclip`` (open_clip CLIP towers): the last block's attention is replaced by its value path,
  ``x = x + out_proj(v(ln_1(x)))``, then the MLP as usual, then ``ln_post`` and the visual projection; the class
  token is dropped.
* ``siglip2-pool-bypass`` (open_clip timm towers with an attention pool): after the final norm, every token goes
  through the pool's value projection and output projection, plus the pool's MLP on the normed result.

Names: ``maskclip-vit-b16``, ``siglip2-vit-b16-512``, any open_clip ViT name (``ViT-S-16``, ...), or a tiny seeded
test model (``tiny-clip-64``, ``tiny-clip-224``, ``small-clip-224``). A CLIP name followed by ``-quickgelu``
(``maskclip-vit-b16-quickgelu``, open_clip's ``ViT-B-16-quickgelu``) builds the tower with QuickGELU, for a local
weights file trained that way (OpenAI's). ``pretrained``: ``None`` (random, seeded), an open_clip pretrained tag
(downloaded by open_clip), or a local weights file (``.safetensors``; ``.pt``/``.bin`` read with
``weights_only=True``); an OpenAI tag (``"openai" in tag``, as the reference decides) turns QuickGELU on. The
weights identity ``weights_id`` of a tag or a file ends in ``+quickgelu`` whenever the tower runs with QuickGELU
(a random one's names the canonical name), so caches computed with another activation never match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from spar_core.backbones.base import (
    Backbone,
    BackboneError,
    Family,
    check_state_dict,
    load_checked_weights,
    load_weights_file,
    random_weights_id,
    register_family,
)

__all__ = ["QUICKGELU_SUFFIX", "tiny_model_config", "interpolate_grid_pos"]


# ---------------------------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TinySpec:
    """A small seeded CLIP for tests and demos (random weights, real open_clip modules)."""

    image_size: int
    width: int = 64
    layers: int = 4
    head_width: int = 16
    embed_dim: int = 32
    text_width: int = 64
    text_layers: int = 2


_TINY: dict[str, _TinySpec] = {
    "tiny-clip-64": _TinySpec(image_size=64),
    "tiny-clip-224": _TinySpec(image_size=224),
    "small-clip-224": _TinySpec(
        image_size=224, width=192, layers=6, head_width=32, embed_dim=96, text_width=128
    ),
}

# name -> (open_clip model name, readout)
_ALIASES: dict[str, tuple[str, str]] = {
    "maskclip-vit-b16": ("ViT-B-16", "maskclip"),
    "siglip2-vit-b16-512": ("ViT-B-16-SigLIP2-512", "siglip2-pool-bypass"),
}


QUICKGELU_SUFFIX = "-quickgelu"
_CLIP_MEAN_STD = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
_HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _names() -> list[str]:
    return sorted(_TINY) + sorted(_ALIASES) + [m for m in open_clip.list_models() if m.startswith("ViT-")]


def _owns(name: str) -> bool:
    base = name.removesuffix(QUICKGELU_SUFFIX)
    if base in _TINY or base in _ALIASES:
        return True
    oc_models = open_clip.list_models()
    return any(n.startswith("ViT-") and n in oc_models for n in (name, base))


def _family_mean_std(oc_name: str | None, tag: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input normalisation of a model family, independent of where the weights come from.

    SigLIP/SigLIP2 towers: mean = std = 0.5 (the reference's ``processing_params``). Otherwise an open_clip
    pretrained tag's own values when a tag is given; else the value every tag of that model name agrees on; else
    OpenAI CLIP's (tiny models, the reference's CLIP ``processing_params``).
    """
    if oc_name is None:
        return _CLIP_MEAN_STD
    if "siglip" in oc_name.lower():
        return _HALF_MEAN_STD
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(oc_name)
    cfgs = [open_clip.get_pretrained_cfg(oc_name, t) for t in tags]
    found = {(tuple(c["mean"]), tuple(c["std"])) for c in cfgs if c and c.get("mean") and c.get("std")}
    if len(found) == 1:
        return found.pop()
    return _CLIP_MEAN_STD


def _tag_wants_quick_gelu(oc_name: str | None, tag: str | None) -> bool:
    """OpenAI weights (the reference passes ``quick_gelu="openai" in pretrained``) and any tag open_clip marks so."""
    if not tag or oc_name is None:
        return False
    return "openai" in tag or bool(
        (open_clip.get_pretrained_cfg(oc_name, tag) or {}).get("quick_gelu", False)
    )


def _looks_like_path(pretrained: str) -> bool:
    return (
        "/" in pretrained
        or "\\" in pretrained
        or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin"))
    )


# ---------------------------------------------------------------------------------------------------------------
# position embeddings
# ---------------------------------------------------------------------------------------------------------------


def interpolate_grid_pos(
    grid_pos: torch.Tensor,
    src: tuple[int, int],
    dst: tuple[int, int],
    scale_offset: float | None = None,
) -> torch.Tensor:
    """Bicubically resample a grid of position embeddings (no antialias, ``align_corners=False``).

    grid_pos: (src_h * src_w, C) -> (dst_h * dst_w, C). Identity when ``src == dst``.

    ``scale_offset=None`` resamples by size (SigLIP2 in the reference). ``scale_offset=0.1`` passes
    ``scale_factor = ((dst_h + 0.1) / src_h, (dst_w + 0.1) / src_w)`` instead, as the reference's CLIP wrapper does
    (DINO's trick): the output has ``floor(src * scale) = dst`` cells, but the sampling positions use that scale,
    ``x_src = (x_dst + 0.5) * src / (dst + 0.1) - 0.5``, not ``src / dst``.
    """
    if tuple(src) == tuple(dst):
        return grid_pos
    c = grid_pos.shape[-1]
    g = grid_pos.reshape(1, src[0], src[1], c).permute(0, 3, 1, 2).float()  # (1, C, sh, sw)
    if scale_offset is None:
        g = F.interpolate(g, size=tuple(dst), mode="bicubic", align_corners=False, antialias=False)
    else:
        scale = ((dst[0] + scale_offset) / src[0], (dst[1] + scale_offset) / src[1])
        g = F.interpolate(g, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
        if tuple(g.shape[-2:]) != tuple(dst):  # floor(src * scale) must land on dst
            raise BackboneError(f"position grid {src} -> {dst}: scale {scale} gave {tuple(g.shape[-2:])}")
    return g.to(grid_pos.dtype).permute(0, 2, 3, 1).reshape(dst[0] * dst[1], c)  # (dh*dw, C)


# ---------------------------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------------------------


class _OpenClipBackbone(Backbone):
    """An open_clip model behind the :class:`Backbone` interface; text through open_clip's tokenizer."""

    def __init__(self, *args, tokenizer_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer_name = tokenizer_name

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (N, D), not normalised."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self._tokenizer_name)
        tokens = self._tokenizer(list(texts)).to(self.mean.device)
        return self.model.encode_text(tokens).float()


class MaskClipBackbone(_OpenClipBackbone):
    """open_clip ``VisionTransformer`` with the MaskCLIP value-path readout in the last block."""

    readout = "maskclip"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        v = self.model.visual
        if not isinstance(v, open_clip.transformer.VisionTransformer):
            raise BackboneError(
                f"{self.name}: the maskclip readout needs an open_clip VisionTransformer tower"
            )
        if v.attn_pool is not None:
            raise BackboneError(f"{self.name}: attention-pool CLIP towers are not supported by maskclip")
        self.patch_size = int(v.patch_size[0])
        self.native_size = int(v.image_size[0])
        self.native_grid = (int(v.grid_size[0]), int(v.grid_size[1]))
        self.dim = int(v.proj.shape[1]) if v.proj is not None else int(v.ln_post.normalized_shape[0])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    def _pos(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.model.visual.positional_embedding  # (1 + G*G, C)
        grid = interpolate_grid_pos(pos[1:], self.native_grid, (gh, gw), scale_offset=0.1)  # (gh*gw, C)
        return torch.cat([pos[:1], grid], dim=0)  # class token's embedding kept as is

    def _dense(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        v = self.model.visual
        b = x.shape[0]
        t = v.conv1(x).flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        cls = v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(t.dtype)
        t = torch.cat([cls, t], dim=1) + self._pos(gh, gw).to(t.dtype)  # (B, 1+gh*gw, C)
        t = v.ln_pre(t)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            t = t.transpose(0, 1)
        for blk in self.blocks[:-1]:
            t = self._block(blk, t) if batch_first else blk(t)
        if not batch_first:
            t = t.transpose(0, 1)
        t = self._value_path_block(self.blocks[-1], t)  # (B, 1+gh*gw, C)
        t = v.ln_post(t)
        if v.proj is not None:
            t = t @ v.proj  # (B, 1+gh*gw, D)
        return t[:, 1:].reshape(b, gh, gw, -1)  # (B, gh, gw, D)

    @staticmethod
    def _block(blk: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """A standard pre-norm block with fused SDPA (same math as open_clip's ``nn.MultiheadAttention`` path,
        which under CPU autocast falls off its fast path and is several times slower). t: (B, N, C)."""
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first:
            return blk(t)
        b, n, c = t.shape
        heads = attn.num_heads
        qkv = F.linear(blk.ln_1(t), attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3C)
        q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, C/h)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        t = t + blk.ls_1(attn.out_proj(o))
        return t + blk.ls_2(blk.mlp(blk.ln_2(t)))

    @staticmethod
    def _value_path_block(blk: nn.Module, t: torch.Tensor) -> torch.Tensor:
        attn = blk.attn
        c = t.shape[-1]
        w_v = attn.in_proj_weight[2 * c :]  # (C, C)
        b_v = attn.in_proj_bias[2 * c :] if attn.in_proj_bias is not None else None
        vals = F.linear(blk.ln_1(t), w_v, b_v)  # (B, N, C)
        t = t + blk.ls_1(attn.out_proj(vals))
        return t + blk.ls_2(blk.mlp(blk.ln_2(t)))


class SigLipPoolBypassBackbone(_OpenClipBackbone):
    """open_clip timm tower (SigLIP/SigLIP2) read out by bypassing the attention pool's query."""

    readout = "siglip2-pool-bypass"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trunk = getattr(self.model.visual, "trunk", None)
        if trunk is None or getattr(trunk, "attn_pool", None) is None:
            raise BackboneError(
                f"{self.name}: the pool-bypass readout needs a timm ViT with an attention pool"
            )
        if trunk.num_prefix_tokens != 0:
            raise BackboneError(f"{self.name}: prefix tokens are not supported by the pool-bypass readout")
        self.trunk = trunk
        self.patch_size = int(trunk.patch_embed.patch_size[0])
        self.native_grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
        self.native_size = self.native_grid[0] * self.patch_size
        self.dim = int(trunk.attn_pool.out_features)

    @property
    def blocks(self) -> nn.Sequential:
        return self.trunk.blocks

    def _used_by_readout(self, param_name: str) -> bool:
        bypassed = ("model.visual.trunk.attn_pool.latent", "model.visual.trunk.attn_pool.q.")
        return param_name.startswith("model.visual.") and not param_name.startswith(bypassed)

    def _dense(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        tr = self.trunk
        b = x.shape[0]
        t = tr.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        t = tr.patch_embed.norm(t)
        pos = interpolate_grid_pos(tr.pos_embed[0], self.native_grid, (gh, gw))  # (gh*gw, C)
        t = tr.norm_pre(t + pos.to(t.dtype))
        t = tr.norm(tr.blocks(t))  # (B, gh*gw, C)
        pool = tr.attn_pool
        c = t.shape[-1]
        vals = F.linear(t, pool.kv.weight[c:], pool.kv.bias[c:] if pool.kv.bias is not None else None)
        y = pool.proj(vals)  # (B, gh*gw, D)
        if pool.mlp is not None:
            y = y + pool.mlp(pool.norm(y))
        y = self.model.visual.head(y)
        return y.reshape(b, gh, gw, -1)  # (B, gh, gw, D)


# ---------------------------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------------------------


def tiny_model_config(name: str, quick_gelu: bool = False) -> dict:
    """The open_clip model config (the JSON layout of ``open_clip/model_configs``) of a tiny test backbone, so
    that ``open_clip.add_model_config`` + ``open_clip.create_model`` can rebuild it without this project."""
    base = name.removesuffix(QUICKGELU_SUFFIX)
    if base not in _TINY:
        raise BackboneError(f"{name!r} is not a tiny backbone; known: {', '.join(sorted(_TINY))}")
    spec = _TINY[base]
    cfg = {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {
            "image_size": spec.image_size,
            "layers": spec.layers,
            "width": spec.width,
            "head_width": spec.head_width,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": spec.text_width,
            "heads": 4,
            "layers": spec.text_layers,
        },
    }
    if quick_gelu or name.endswith(QUICKGELU_SUFFIX):
        cfg["quick_gelu"] = True
    return cfg


def _tiny_clip(name: str, quick_gelu: bool) -> nn.Module:
    cfg = tiny_model_config(name, quick_gelu)
    return open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=quick_gelu,
    )


@dataclass(frozen=True)
class _Resolved:
    """What a backbone name means: its canonical name, open_clip model, readout, tokenizer and activation."""

    name: str  # canonical: carries "-quickgelu" when QuickGELU was asked for explicitly
    oc_name: str | None  # open_clip model name; None for tiny models
    readout: str
    tokenizer: str
    quick_gelu: bool  # asked for by the name or the flag (a tag may still turn it on)


def _oc_quick_gelu(oc_name: str) -> bool:
    return bool((open_clip.get_model_config(oc_name) or {}).get("quick_gelu", False))


def _resolve_name(name: str, quick_gelu: bool) -> _Resolved:
    """Map a backbone name (optionally ``<name>-quickgelu``) to what to build.

    The canonical name rebuilds the same tower: open_clip's own ``*-quickgelu`` config where one exists, else the
    name with the ``-quickgelu`` suffix.
    """
    oc_models = set(open_clip.list_models())
    if name.startswith("ViT-") and name in oc_models:
        base, qg = name, quick_gelu or _oc_quick_gelu(name)
    else:
        base = name.removesuffix(QUICKGELU_SUFFIX)
        qg = quick_gelu or base != name
    if base.startswith("ViT-") and base in oc_models:
        oc_name = base
        if qg and not _oc_quick_gelu(base) and base + QUICKGELU_SUFFIX in oc_models:
            oc_name = base + QUICKGELU_SUFFIX
        canon = base + QUICKGELU_SUFFIX if qg and not _oc_quick_gelu(oc_name) else oc_name
        readout = "siglip2-pool-bypass" if "SigLIP" in base else "maskclip"
        resolved = _Resolved(canon, oc_name, readout, oc_name, qg)
    elif base in _TINY:
        resolved = _Resolved(base + QUICKGELU_SUFFIX if qg else base, None, "maskclip", "ViT-B-16", qg)
    elif base in _ALIASES:
        oc_name, readout = _ALIASES[base]
        resolved = _Resolved(base + QUICKGELU_SUFFIX if qg else base, oc_name, readout, oc_name, qg)
    else:
        raise BackboneError(f"unknown backbone {name!r}; known: {_KNOWN}")
    if resolved.quick_gelu and resolved.readout != "maskclip":
        raise BackboneError(
            f"{name}: QuickGELU applies to CLIP towers only, not the {resolved.readout} readout"
        )
    return resolved


def _make_model(
    r: _Resolved, pretrained: str | None, seed: int
) -> tuple[nn.Module, str, bool, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Build the open_clip model: (model, weights identity, QuickGELU on, family mean/std)."""
    tag = pretrained if pretrained and not _looks_like_path(pretrained) else None
    quick = r.quick_gelu or _tag_wants_quick_gelu(r.oc_name, tag)
    mean_std = _family_mean_std(r.oc_name, tag)
    suffix = "+quickgelu" if quick else ""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if r.oc_name is None:
            if tag:
                raise BackboneError(f"{r.name}: pretrained tag {tag!r} is not available for tiny models")
            model = _tiny_clip(r.name, quick)
        else:
            try:
                model = open_clip.create_model(r.oc_name, pretrained=tag, force_quick_gelu=quick)
            except RuntimeError as e:  # unknown model names, unavailable tags, ...
                raise BackboneError(
                    f"cannot build open_clip model {r.oc_name!r} (pretrained={tag!r}): {e}"
                ) from e
            if tag:
                return model, f"openclip:{r.oc_name}:{tag}{suffix}", quick, mean_std
    if pretrained is None:  # the canonical name already carries "-quickgelu"
        return model, random_weights_id(r.name, seed), quick, mean_std
    sd = load_weights_file(pretrained)
    check_state_dict(f"weights file {pretrained} does not match {r.name}", sd, model.state_dict())
    return model, load_checked_weights(model, sd) + suffix, quick, mean_std


def _build(name: str, pretrained: str | None, seed: int, quick_gelu: bool) -> Backbone:
    r = _resolve_name(name, quick_gelu)
    model, weights_id, quick, mean_std = _make_model(r, pretrained, seed)
    cls = MaskClipBackbone if r.readout == "maskclip" else SigLipPoolBypassBackbone
    bb = cls(
        model,
        name=r.name,
        pretrained=pretrained,
        weights_id=weights_id,
        tokenizer_name=r.tokenizer,
        mean_std=mean_std,
        quick_gelu=quick,
    )
    bb.open_clip_name = r.oc_name
    return bb


_KNOWN = (
    f"{', '.join(sorted(_TINY) + sorted(_ALIASES))} (each optionally with {QUICKGELU_SUFFIX!r}), "
    "or any open_clip ViT-* model name"
)
register_family(Family("openclip", _owns, _build, _names, _KNOWN))
