"""The dino.txt model (DINOv3 ViT-L/16 backbone, vision head, text tower) as plain torch modules.

Module and parameter names follow Meta's ``facebookresearch/dinov3`` (hub entry
``dinov3_vitl16_dinotxt_tet1280d20h24l``), so the two released weight files load without any key mapping;
``spar_core/backbones/dinov3txt.py`` puts the model behind the backbone interface and reads those files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spar_core.backbones.base import BackboneError

__all__ = ["BACKBONE_PREFIX", "TINY_SPEC", "DinoTxtSpec", "DinoTxt", "build_dinotxt", "meta_state_dicts"]

BACKBONE_PREFIX = "visual_model.backbone."


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


TINY_SPEC = DinoTxtSpec(
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
