"""DINOv3 dino.txt (ViT-L/16 backbone + vision head + text tower) as a SPAR backbone.

Architecture and parameter names follow Meta's ``facebookresearch/dinov3`` (hub entry
``dinov3_vitl16_dinotxt_tet1280d20h24l``), so the two released weight files load without any key mapping:

* **vision backbone** (``dinov3_vitl16_pretrain_lvd1689m-*.pth``, loaded strictly by Meta's hub): a ViT-L/16
  without position embeddings: patch-embed conv, a class token and 4 register ("storage") tokens, 24 pre-norm
  blocks (LayerNorm eps 1e-5, qkv with the key bias masked out by a stored ``bias_mask``, layer scale, GELU MLP)
  with axial RoPE on the patch tokens only (coordinates normalised per axis to [-1, 1], ``periods`` buffer of
  base 100), a final LayerNorm.
* **vision head + text tower** (``dinov3_vitl16_dinotxt_vision_head_and_text_encoder-*.pth``, keys relative to
  Meta's ``DINOTxt`` module, without ``visual_model.backbone.*``): two more blocks over the backbone's normed
  tokens (no RoPE, no qkv bias, SwiGLU FFN aligned to 64) and a LayerNorm; a causal text transformer (width
  1280, 20 heads, 24 layers, no qkv bias, GELU MLP, context 77, vocab 49408), its final LayerNorm, a bias-free
  projection 1280 -> 2048, pooled at the end-of-text token (the argmax of the token ids); ``logit_scale``.

Readouts (``dense``: (B, 3, H, W) -> (B, H/p, W/p, 1024)):

* ``dinotxt-backbone-patch`` (``dinov3txt-vitl16``, the reference): the authors' SPAR wrapper and Meta's
  zero-shot segmentation notebook both take the *third* output of ``VisionTower.get_class_and_patch_tokens``,
  which is the backbone's patch tokens after its final norm (the vision head runs but its output is unused).
* ``dinotxt-head-patch`` (``dinov3txt-vitl16-head``): the vision head's patch tokens (the second output), the
  tokens whose mean was trained against the text during dino.txt training.

Text embeddings are the image-aligned half of the 2048-d text output (``[:, 1024:]``; the first half pairs with
the class token). The tokenizer is CLIP's BPE (``bpe_simple_vocab_16e6.txt.gz``, the same file name, vocabulary
size and special tokens as Meta's ``dinov3/thirdparty/CLIP`` tokenizer): by default the copy shipped inside the
installed ``open_clip`` package, or a vocabulary file the user passes (see :func:`parse_pretrained`).

``--pretrained`` takes ``BACKBONE.pth,HEAD.pth[,VOCAB.txt.gz]`` (comma-separated local paths: the backbone
file, the vision-head-and-text-encoder file, optionally the BPE vocabulary). Weight files are read with
``torch.load(weights_only=True)`` (or safetensors).

Pure model code: no network, no torch.hub.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from spar_core.backbones.dinotxt_model import (
    BACKBONE_PREFIX,
    TINY_SPEC,
    DinoTxt,
    DinoTxtSpec,
    build_dinotxt,
    meta_state_dicts,
)

__all__ = ["DINOTXT_BACKBONES", "DinoTxtBackbone", "parse_pretrained", "reference_resize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READOUT_BACKBONE = "dinotxt-backbone-patch"
READOUT_HEAD = "dinotxt-head-patch"


# name -> (spec, readout)
DINOTXT_BACKBONES: dict[str, tuple[DinoTxtSpec, str]] = {
    "dinov3txt-vitl16": (DinoTxtSpec(), READOUT_BACKBONE),
    "dinov3txt-vitl16-head": (DinoTxtSpec(), READOUT_HEAD),
    "tiny-dinov3txt": (TINY_SPEC, READOUT_BACKBONE),
    "tiny-dinov3txt-head": (TINY_SPEC, READOUT_HEAD),
}


def load_meta_weights(model: DinoTxt, backbone_path: str, head_path: str) -> str:
    """Load Meta's two released files into ``model`` (every key checked; ``logit_scale`` may be absent); returns
    the weights id."""
    want_bb, want_head = meta_state_dicts(model)
    sd_bb = load_weights_file(backbone_path)
    sd_head = load_weights_file(head_path)
    if any(k.startswith(("text_model.", "visual_model.")) for k in sd_bb):
        raise BackboneError(
            f"{backbone_path} holds the vision head / text encoder; pass the backbone file first: BACKBONE,HEAD"
        )
    layout = "does not match the dino.txt layout"
    check_state_dict(f"backbone file {backbone_path} {layout}", sd_bb, want_bb)
    check_state_dict(
        f"vision-head-and-text-encoder file {head_path} {layout}",
        sd_head,
        want_head,
        optional=("logit_scale",),
    )
    return load_checked_weights(model, {BACKBONE_PREFIX + k: v for k, v in sd_bb.items()} | sd_head)


@dataclass(frozen=True)
class WeightFiles:
    backbone: str
    head: str
    vocab: str | None = None


def parse_pretrained(pretrained: str) -> WeightFiles:
    """``BACKBONE.pth,HEAD.pth[,VOCAB.txt.gz]``: Meta's two released files, optionally the BPE vocabulary."""
    parts = [p.strip() for p in pretrained.split(",")]
    if len(parts) in (2, 3) and all(parts):
        return WeightFiles(*parts)
    raise BackboneError(
        f"dino.txt weights {pretrained!r}: pass 'BACKBONE.pth,HEAD.pth[,VOCAB.txt.gz]', e.g. "
        "'dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth,"
        "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth'"
    )


# ---------------------------------------------------------------------------------------------------------------
# backbone interface
# ---------------------------------------------------------------------------------------------------------------


def reference_resize(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Stretch (B, 3, H, W) bicubically to the next multiples of ``patch`` (no-op when already there), as the
    reference's ``DINOv3txtWrapper.encode_image`` does."""
    h, w = x.shape[-2:]
    nh, nw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)


class DinoTxtBackbone(Backbone):
    """dino.txt behind the common :class:`~spar_core.backbones.base.Backbone` interface."""

    def __init__(
        self,
        model: DinoTxt,
        name: str,
        pretrained: str | None,
        weights_id: str,
        readout: str,
        vocab: str | None,
    ):
        super().__init__(model, name, pretrained, weights_id, mean_std=(IMAGENET_MEAN, IMAGENET_STD))
        s = model.spec
        self.readout = readout
        self.patch_size = s.patch_size
        self.native_size = s.native_size
        self.dim = s.dim
        self._vocab = vocab
        self._n_prefix = 1 + s.storage_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual_model.backbone.blocks

    def _used_by_readout(self, param_name: str) -> bool:
        """SPAR-ALL trains what the dense readout reaches: the backbone (less its mask token, used only in masked
        pre-training) and, for the head readout, the vision head; the text tower stays frozen."""
        prefixes = ("model.visual_model.backbone.",)
        if self.readout == READOUT_HEAD:
            prefixes += ("model.visual_model.head.",)
        return param_name.startswith(prefixes) and not param_name.endswith(".mask_token")

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), D); sizes that are not multiples of the patch size are
        stretched bicubically first, as the reference does (the pipeline always passes multiples)."""
        if x.ndim == 4 and x.shape[1] == 3 and min(x.shape[-2:]) > 0:
            x = reference_resize(x, self.patch_size)
        return super().dense(x)

    def _dense(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        b = x.shape[0]
        if self.readout == READOUT_HEAD:
            _, patches, _ = self.model.image_tokens(x)  # (B, gh*gw, C)
        else:  # the reference's readout: the backbone's normed patch tokens (the head's output is unused)
            patches = self.model.visual_model.backbone.forward_tokens(x)[:, self._n_prefix :]
        return patches.reshape(b, gh, gw, -1)  # (B, gh, gw, D)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP BPE token ids (N, 77): start token, text, end token, zero padding (truncated with end token)."""
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer, default_bpe

            bpe = self._vocab or default_bpe()
            self._tokenizer = SimpleTokenizer(bpe_path=bpe, context_length=self.model.spec.context_length)
        return self._tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """The image-patch-aligned half of the text embedding (N, D), not normalised."""
        ids = self.tokenize(texts).to(self.mean.device)
        e = self.model.text_model(ids)  # (N, embed_dim)
        return e[:, e.shape[1] // 2 :].float()


def _build(name: str, pretrained: str | None, seed: int, quick_gelu: bool) -> DinoTxtBackbone:
    """A named dino.txt backbone (random seeded weights, or Meta's two files); ``quick_gelu`` does not apply."""
    spec, readout = DINOTXT_BACKBONES[name]
    vocab = None
    if pretrained is None:
        model = build_dinotxt(spec, seed=seed)
        weights_id = random_weights_id(name, seed)
    else:
        files = parse_pretrained(pretrained)
        model = build_dinotxt(spec, device="meta").to_empty(device="cpu")  # every tensor comes from the files
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))  # the one tensor a head file may leave out
        weights_id = load_meta_weights(model, files.backbone, files.head)
        vocab = files.vocab
    bb = DinoTxtBackbone(model, name, pretrained, weights_id, readout, vocab)
    if vocab is not None:  # read it now, so a bad path fails here and not at the first text
        try:
            bb.tokenize(["a"])
        except Exception as e:  # missing file, not gzip, not a BPE merges list
            raise BackboneError(f"cannot read BPE vocabulary file {vocab}: {type(e).__name__}: {e}") from e
    return bb


register_family(
    Family(
        "dinov3txt",
        DINOTXT_BACKBONES.__contains__,
        _build,
        lambda: sorted(DINOTXT_BACKBONES),
        ", ".join(sorted(DINOTXT_BACKBONES)),
    )
)
