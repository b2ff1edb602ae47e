"""An independent forward of Meta's dino.txt, written from Meta's module definitions
(dinov3/models/vision_transformer.py, dinov3/layers/{attention,block,ffn_layers,rope_position_encoding}.py,
dinov3/eval/text/{vision_tower,text_tower,text_transformer}.py) with plain torch ops over the two state dicts as
Meta publishes them. It shares no code with spar_core.backbones: RoPE is a complex rotation per position,
attention an explicit softmax. Used by tests/core/test_dinov3txt.py (and importable without the pipeline).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, pre, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[pre + "weight"], sd[pre + "bias"], eps)


def _rotate(t, theta):
    """RoPE as a complex rotation: pair (d, d + Dh/2) is one complex number, rotated by theta (N, Dh/2)."""
    half = t.shape[-1] // 2
    z = torch.complex(t[..., :half].double(), t[..., half:].double()) * torch.polar(
        torch.ones_like(theta), theta
    )
    return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)


def _rope_angles(periods, gh, gw):
    """(gh*gw, Dh/2): for the patch at row i, column j, [2pi*y/periods, 2pi*x/periods], y, x in (-1, 1)."""
    rows = []
    for i in range(gh):
        for j in range(gw):
            y, x = 2 * (i + 0.5) / gh - 1, 2 * (j + 0.5) / gw - 1
            rows.append(torch.cat([2 * math.pi * y / periods.double(), 2 * math.pi * x / periods.double()]))
    return torch.stack(rows)


def _attention(x, sd, pre, heads, *, bias=None, theta=None, n_prefix=0, causal=False):
    b, n, c = x.shape
    qkv = x @ sd[pre + "qkv.weight"].T
    if bias is not None:
        qkv = qkv + bias
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in qkv.split(c, dim=-1))
    if theta is not None:  # patch tokens only
        q = torch.cat([q[:, :, :n_prefix], _rotate(q[:, :, n_prefix:], theta)], dim=2)
        k = torch.cat([k[:, :, :n_prefix], _rotate(k[:, :, n_prefix:], theta)], dim=2)
    s = q @ k.transpose(-1, -2) / math.sqrt(c // heads)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return o @ sd[pre + "proj.weight"].T + sd[pre + "proj.bias"]


def _lin(x, sd, pre):
    return x @ sd[pre + "weight"].T + sd[pre + "bias"]


def ref_backbone_tokens(sd, x, heads, reg, coord_scales=None):
    """Meta's DinoVisionTransformer.get_intermediate_layers(n=1, norm=True): normed tokens (B, 1+reg+N, C).

    ``coord_scales``: per block, the factor Meta's RoPE multiplies the coordinates by in training mode."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)  # (B, C, gh, gw)
    b, c, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), sd["storage_tokens"].expand(b, -1, -1), t], dim=1)
    theta = _rope_angles(sd["rope_embed.periods"], gh, gw)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        pre = f"blocks.{i}."
        bias = sd[pre + "attn.qkv.bias"] * sd[pre + "attn.qkv.bias_mask"]  # LinearKMaskedBias
        th = (
            theta if coord_scales is None else theta * coord_scales[i]
        )  # angles are linear in the coordinates
        a = _attention(
            _ln(t, sd, pre + "norm1."), sd, pre + "attn.", heads, bias=bias, theta=th, n_prefix=1 + reg
        )
        t = t + a * sd[pre + "ls1.gamma"]
        h = _ln(t, sd, pre + "norm2.")
        m = _lin(F.gelu(_lin(h, sd, pre + "mlp.fc1.")), sd, pre + "mlp.fc2.")
        t = t + m * sd[pre + "ls2.gamma"]
        i += 1
    return _ln(t, sd, "norm.")


def ref_head_tokens(hd, tokens, heads):
    """dino.txt VisionHead: SelfAttentionBlocks without RoPE / qkv bias, SwiGLU FFN, then ln_final."""
    t = tokens
    i = 0
    while f"visual_model.head.blocks.{i}.norm1.weight" in hd:
        pre = f"visual_model.head.blocks.{i}."
        t = t + _attention(_ln(t, hd, pre + "norm1."), hd, pre + "attn.", heads) * hd[pre + "ls1.gamma"]
        h = _ln(t, hd, pre + "norm2.")
        m = _lin(F.silu(_lin(h, hd, pre + "mlp.w1.")) * _lin(h, hd, pre + "mlp.w2."), hd, pre + "mlp.w3.")
        t = t + m * hd[pre + "ls2.gamma"]
        i += 1
    return _ln(t, hd, "visual_model.head.ln_final.")


def ref_text(hd, ids, heads):
    """TextTransformer + TextHead projection, pooled at argmax(ids), image-patch half."""
    pre = "text_model.backbone."
    t = hd[pre + "token_embedding.weight"][ids] + hd[pre + "positional_embedding"][: ids.shape[1]]
    i = 0
    while f"{pre}blocks.{i}.attention_norm.weight" in hd:
        bp = f"{pre}blocks.{i}."
        t = t + _attention(_ln(t, hd, bp + "attention_norm."), hd, bp + "attention.", heads, causal=True)
        h = _ln(t, hd, bp + "ffn_norm.")
        t = t + _lin(F.gelu(_lin(h, hd, bp + "feed_forward.fc1.")), hd, bp + "feed_forward.fc2.")
        i += 1
    t = _ln(t, hd, pre + "ln_final.") @ hd["text_model.head.linear_projection.weight"].T
    e = torch.stack([t[n, ids[n].argmax()] for n in range(ids.shape[0])])
    return e[:, e.shape[1] // 2 :]
