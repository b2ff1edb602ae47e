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

from spar_core.backbones import Backbone, BackboneError, _load_weights_file, state_dict_sha256

__all__ = [
    "DINOTXT_BACKBONES",
    "DinoTxtSpec",
    "DinoTxt",
    "DinoTxtBackbone",
    "build_dinotxt",
    "build_dinotxt_backbone",
    "meta_state_dicts",
    "parse_pretrained",
    "reference_resize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_PREFIX = "visual_model.backbone."
READOUT_BACKBONE = "dinotxt-backbone-patch"
READOUT_HEAD = "dinotxt-head-patch"


@dataclass(frozen=True)
class DinoTxtSpec:
    """Sizes of a dino.txt model (defaults: the released ViT-L/16 + 1280-wide text tower)."""

    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    storage_tokens: int = 4
    ffn_ratio: float = 4.0
    rope_base: float = 100.0
    rope_rescale_coords: float | None = 2.0  # training-mode coordinate augmentation (Meta's dinov3_vitl16)
    head_blocks: int = 2
    swiglu_align: int = 64
    text_dim: int = 1280
    text_heads: int = 20
    text_layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 2048
    native_size: int = 384  # the reference's sliding crop (configs/dinov3txt: slide_crop = 384)
    ls_init: float = 1e-5  # layer-scale init of random weights (Meta's init_weights)


_TINY = DinoTxtSpec(
    dim=64,
    depth=4,
    heads=4,
    text_dim=64,
    text_heads=4,
    text_layers=2,
    embed_dim=128,
    native_size=64,
    ls_init=0.5,
)

# name -> (spec, readout)
DINOTXT_BACKBONES: dict[str, tuple[DinoTxtSpec, str]] = {
    "dinov3txt-vitl16": (DinoTxtSpec(), READOUT_BACKBONE),
    "dinov3txt-vitl16-head": (DinoTxtSpec(), READOUT_HEAD),
    "tiny-dinov3txt": (_TINY, READOUT_BACKBONE),
    "tiny-dinov3txt-head": (_TINY, READOUT_HEAD),
}


# ---------------------------------------------------------------------------------------------------------------
# layers (module and parameter names as in dinov3/layers)
# ---------------------------------------------------------------------------------------------------------------


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, align_to: int):
        super().__init__()
        d = int(hidden * 2 / 3)
        d += -d % align_to
        self.w1 = nn.Linear(dim, d)
        self.w2 = nn.Linear(dim, d)
        self.w3 = nn.Linear(d, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class RopePositionEmbedding(nn.Module):
    """Axial RoPE without learnable weights; ``periods`` is a persistent buffer (it is in Meta's files).

    In training mode (only), Meta's module multiplies the coordinates by a log-uniform factor in
    ``[1/rescale, rescale]`` drawn from the global RNG on every call (``pos_embed_rope_rescale_coords=2`` for
    dinov3_vitl16); eval mode is deterministic. The pipeline keeps students in eval mode.
    """

    def __init__(self, dim: int, heads: int, base: float, rescale_coords: float | None = None):
        super().__init__()
        self.rescale_coords = rescale_coords
        if dim % (4 * heads):
            raise BackboneError(f"RoPE needs the width {dim} to be a multiple of 4 x heads ({heads})")
        d_head = dim // heads
        periods = base ** (2 * torch.arange(d_head // 4, dtype=torch.float32) / (d_head // 2))  # (Dh/4,)
        self.register_buffer("periods", periods, persistent=True)

    def forward(self, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sin, cos of the patch grid, each (gh*gw, Dh), computed in float32 (Meta's ``pos_embed_rope_dtype``)."""
        dev = self.periods.device
        ch = torch.arange(0.5, gh, device=dev, dtype=torch.float32) / gh  # (gh,) in (0, 1)
        cw = torch.arange(0.5, gw, device=dev, dtype=torch.float32) / gw  # (gw,)
        coords = (
            torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        )  # (N, 2)
        if self.training and self.rescale_coords is not None:
            r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=dev, dtype=torch.float32).uniform_(-r, r).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # (N, 2, Dh/4)
        angles = angles.flatten(1, 2).tile(2)  # (N, Dh)
        return torch.sin(angles), torch.cos(angles)


def _rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x: (B, h, N, Dh); rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    """Multi-head attention; ``mask_k_bias`` stores Meta's ``bias_mask`` buffer (zeros the key bias)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, mask_k_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if mask_k_bias and qkv_bias:
            mask = torch.ones(3 * dim)
            mask[dim : 2 * dim] = 0.0
            self.qkv.register_buffer("bias_mask", mask, persistent=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        bias = self.qkv.bias
        if bias is not None and hasattr(self.qkv, "bias_mask"):
            bias = bias * self.qkv.bias_mask.to(bias.dtype)
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, Dh)
        if rope is not None:
            q, k = self._rope(q, rope), self._rope(k, rope)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    @staticmethod
    def _rope(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate the trailing patch tokens in float32; prefix (class, register) tokens are left as they are."""
        sin, cos = rope
        prefix = t.shape[-2] - sin.shape[-2]
        rot = _rope_apply(t[:, :, prefix:].float(), sin, cos).to(t.dtype)
        return torch.cat([t[:, :, :prefix], rot], dim=-2)


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module, qkv_bias: bool, mask_k_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SelfAttention(dim, heads, qkv_bias, mask_k_bias)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = ffn
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


# ---------------------------------------------------------------------------------------------------------------
# vision
# ---------------------------------------------------------------------------------------------------------------


class DinoVisionTransformer(nn.Module):
    """Meta's ``DinoVisionTransformer`` as configured by ``dinov3_vitl16`` (inference path only)."""

    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        self.patch_size = s.patch_size
        self.n_storage_tokens = s.storage_tokens
        self.patch_embed = PatchEmbed(s.patch_size, s.dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, s.dim))
        self.storage_tokens = nn.Parameter(torch.empty(1, s.storage_tokens, s.dim))
        self.rope_embed = RopePositionEmbedding(s.dim, s.heads, s.rope_base, s.rope_rescale_coords)
        hidden = int(s.dim * s.ffn_ratio)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(s.dim, s.heads, Mlp(s.dim, hidden), qkv_bias=True, mask_k_bias=True)
            for _ in range(s.depth)
        )
        self.norm = nn.LayerNorm(s.dim, eps=1e-5)
        self.mask_token = nn.Parameter(torch.empty(1, s.dim))  # training-only; kept for the key layout

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normed tokens (B, 1 + R + gh*gw, C): class, registers, patches (row-major)."""
        b = x.shape[0]
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).to(t.dtype)  # (1, 1+R, C)
        t = torch.cat([prefix.expand(b, -1, -1), t], dim=1)  # (B, 1+R+gh*gw, C)
        rope = None if self.rope_embed.training else self.rope_embed(gh, gw)  # Meta: one call per block
        for blk in self.blocks:
            t = blk(t, rope if rope is not None else self.rope_embed(gh, gw))
        return self.norm(t)


class VisionHead(nn.Module):
    """dino.txt's vision head: extra blocks (no RoPE) and a LayerNorm over the backbone's normed tokens."""

    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        hidden = int(s.dim * s.ffn_ratio)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                s.dim, s.heads, SwiGLUFFN(s.dim, hidden, s.swiglu_align), qkv_bias=False, mask_k_bias=False
            )
            for _ in range(s.head_blocks)
        )
        self.ln_final = nn.LayerNorm(s.dim)
        if 2 * s.dim != s.embed_dim:  # Meta adds a projection then; the released model has none
            raise BackboneError(f"embed_dim {s.embed_dim} must be twice the vision width {s.dim}")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            t = blk(t)
        return self.ln_final(t)


class VisionTower(nn.Module):
    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        self.backbone = DinoVisionTransformer(s)
        self.head = VisionHead(s)


# ---------------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class CausalSelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_ratio: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = Mlp(dim, int(dim * ffn_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TextTransformer(nn.Module):
    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        self.token_embedding = nn.Embedding(s.vocab_size, s.text_dim)
        self.positional_embedding = nn.Parameter(torch.empty(s.context_length, s.text_dim))
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(s.text_dim, s.text_heads, s.ffn_ratio) for _ in range(s.text_layers)
        )
        self.ln_final = nn.LayerNorm(s.text_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, Ct)."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.ln_final(x)


class TextHead(nn.Module):
    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        self.linear_projection = nn.Linear(s.text_dim, s.embed_dim, bias=False)


class TextTower(nn.Module):
    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        self.backbone = TextTransformer(s)
        self.head = TextHead(s)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, embed_dim), read at the end-of-text token (the largest id)."""
        t = self.head.linear_projection(self.backbone(ids))  # (N, L, E)
        return t[torch.arange(t.shape[0], device=t.device), ids.argmax(dim=-1)]


class DinoTxt(nn.Module):
    """Meta's ``DINOTxt`` module tree (``visual_model``, ``text_model``, ``logit_scale``)."""

    def __init__(self, s: DinoTxtSpec):
        super().__init__()
        self.spec = s
        self.visual_model = VisionTower(s)
        self.text_model = TextTower(s)
        self.logit_scale = nn.Parameter(torch.empty(1))

    def image_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Meta's ``VisionTower.get_class_and_patch_tokens``: (head class token (B, C), head patch tokens
        (B, gh*gw, C), backbone patch tokens (B, gh*gw, C))."""
        r = 1 + self.visual_model.backbone.n_storage_tokens
        t = self.visual_model.backbone.forward_tokens(x)  # (B, r + gh*gw, C)
        h = self.visual_model.head(t)
        return h[:, 0], h[:, r:], t[:, r:]


# ---------------------------------------------------------------------------------------------------------------
# initialisation, weights
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_random(m: DinoTxt) -> None:
    """Meta's ``init_weights`` scheme (truncated-normal linears, zero biases, layer scale at ``ls_init``)."""
    s = m.spec
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm):
            mod.reset_parameters()
        elif isinstance(mod, LayerScale):
            mod.gamma.fill_(s.ls_init)
    pe = m.visual_model.backbone.patch_embed.proj
    k = 1 / math.sqrt(3 * s.patch_size**2)
    nn.init.uniform_(pe.weight, -k, k)
    nn.init.uniform_(pe.bias, -k, k)
    bb = m.visual_model.backbone
    nn.init.normal_(bb.cls_token, std=0.02)
    nn.init.normal_(bb.storage_tokens, std=0.02)
    nn.init.zeros_(bb.mask_token)
    tb = m.text_model.backbone
    nn.init.normal_(tb.token_embedding.weight, std=0.02)
    nn.init.normal_(tb.positional_embedding, std=0.01)
    m.logit_scale.fill_(math.log(1 / 0.07))


def build_dinotxt(spec: DinoTxtSpec, seed: int = 0, device: str | torch.device = "cpu") -> DinoTxt:
    """A dino.txt model with random weights seeded by ``seed`` (``device="meta"``: shapes only, no data)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            m = DinoTxt(spec)
        if str(device) != "meta":
            _init_random(m)
    return m


def meta_state_dicts(model: DinoTxt) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's weights as Meta publishes them: (backbone file, vision-head-and-text-encoder file)."""
    sd = model.state_dict()
    backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIX)}
    head = {k: v for k, v in sd.items() if not k.startswith(BACKBONE_PREFIX)}
    return backbone, head


def _check_keys(
    what: str, path: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], optional=()
) -> None:
    missing = sorted(set(want) - set(got) - set(optional))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        raise BackboneError(
            f"{what} file {path} does not match the dino.txt layout: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    bad = [k for k in got if tuple(got[k].shape) != tuple(want[k].shape)]
    if bad:
        k = bad[0]
        raise BackboneError(
            f"{what} file {path}: {k} has shape {tuple(got[k].shape)}, expected {tuple(want[k].shape)} "
            f"({len(bad)} mismatching tensors)"
        )


def load_meta_weights(model: DinoTxt, backbone_path: str, head_path: str) -> None:
    """Load Meta's two released files into ``model`` (every key checked; ``logit_scale`` may be absent)."""
    want_bb, want_head = meta_state_dicts(model)
    sd_bb = _load_weights_file(backbone_path)
    sd_head = _load_weights_file(head_path)
    if any(k.startswith(("text_model.", "visual_model.")) for k in sd_bb):
        raise BackboneError(
            f"{backbone_path} holds the vision head / text encoder; pass the backbone file first: BACKBONE,HEAD"
        )
    _check_keys("backbone", backbone_path, sd_bb, want_bb)
    _check_keys("vision-head-and-text-encoder", head_path, sd_head, want_head, optional=("logit_scale",))
    full = {BACKBONE_PREFIX + k: v for k, v in sd_bb.items()} | sd_head
    with torch.no_grad():
        for k, t in model.state_dict().items():  # copy_ casts dtypes; bit-exact for same-dtype files
            if k in full:
                t.copy_(full[k])


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
    """dino.txt behind the common :class:`~spar_core.backbones.Backbone` interface."""

    def __init__(
        self,
        model: DinoTxt,
        name: str,
        pretrained: str | None,
        weights_id: str,
        readout: str,
        vocab: str | None,
    ):
        model.preprocess_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}  # read by Backbone.__init__
        super().__init__(model, name, pretrained, weights_id, tokenizer_name="")
        self.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
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
            from open_clip.tokenizer import SimpleTokenizer

            ctx = self.model.spec.context_length
            self._tokenizer = (
                SimpleTokenizer(bpe_path=self._vocab, context_length=ctx)
                if self._vocab
                else SimpleTokenizer(context_length=ctx)
            )
        return self._tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """The image-patch-aligned half of the text embedding (N, D), not normalised."""
        ids = self.tokenize(texts).to(self.mean.device)
        e = self.model.text_model(ids)  # (N, embed_dim)
        return e[:, e.shape[1] // 2 :].float()


def build_dinotxt_backbone(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DinoTxtBackbone:
    """Build a named dino.txt backbone, frozen, in eval mode (random seeded weights, or Meta's two files)."""
    if name not in DINOTXT_BACKBONES:
        raise BackboneError(
            f"unknown dino.txt backbone {name!r}; known: {', '.join(sorted(DINOTXT_BACKBONES))}"
        )
    spec, readout = DINOTXT_BACKBONES[name]
    vocab = None
    if pretrained is None:
        model = build_dinotxt(spec, seed=seed)
        weights_id = f"random:{name}:seed{seed}"
    else:
        files = parse_pretrained(pretrained)
        model = build_dinotxt(spec, device="meta").to_empty(device="cpu")  # every tensor comes from the files
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))  # the one tensor a head file may leave out
        load_meta_weights(model, files.backbone, files.head)
        vocab = files.vocab
        weights_id = "sha256:" + state_dict_sha256(model.state_dict())
    bb = DinoTxtBackbone(model, name, pretrained, weights_id, readout, vocab)
    if vocab is not None:  # read it now, so a bad path fails here and not at the first text
        try:
            bb.tokenize(["a"])
        except Exception as e:  # missing file, not gzip, not a BPE merges list
            raise BackboneError(f"cannot read BPE vocabulary file {vocab}: {type(e).__name__}: {e}") from e
    bb.set_trainable(0)
    return bb.to(device=device, dtype=dtype).eval()
