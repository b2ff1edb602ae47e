"""Parity with the authors' reference code (naomikombol/SPAR 0f63ff2) on the same weights.

Every reference here is re-implemented in this file from the reference's behaviour (models/model_open_clip.py,
models/model_siglip2.py, segmentors/segmentor_vit.py), without the project's forward: its position-embedding
interpolation calls, a hand-written transformer block (attention, LayerNorm, MLP and activation written out),
its SigLIP2 attention-pool bypass. Sizes are non-native and non-square (448x672 for 224-native towers).
"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from spar_core import build_backbone
from spar_core.backbones.openclip import (
    _family_mean_std,
    _tag_wants_quick_gelu,
    interpolate_grid_pos,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of ``a`` to the reference ``b``."""
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------------------- reference: CLIP


def ref_clip_pos(pos: torch.Tensor, img_h: int, img_w: int, patch: int) -> torch.Tensor:
    """OpenCLIPWrapper.interpolate_pos_encoding as the reference calls it: ``B, nc, w, h = x.shape`` (so its
    ``w`` is the image height), ``w0, h0 = w // p + 0.1, h // p + 0.1`` and
    ``F.interpolate(..., scale_factor=(w0 / sqrt(N), h0 / sqrt(N)), mode="bicubic", antialias=False)``;
    the class token's embedding is kept. pos: (1 + N, C) -> (1 + gh*gw, C)."""
    n = pos.shape[0] - 1
    side = int(math.sqrt(n))
    w0, h0 = img_h // patch + 0.1, img_w // patch + 0.1
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic", antialias=False
    )
    assert (int(w0), int(h0)) == tuple(grid.shape[-2:])
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])], dim=0)


def _ln(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _act(x: torch.Tensor, quick: bool) -> torch.Tensor:
    if quick:
        return x * torch.sigmoid(1.702 * x)
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _attn(x: torch.Tensor, attn: torch.nn.MultiheadAttention) -> torch.Tensor:
    """Plain multi-head self-attention from the packed weights. x: (B, N, C)."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, c // h).transpose(1, 2) for t in (q, k, v))  # (B, h, N, C/h)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
    o = (a @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


def _mlp(x: torch.Tensor, mlp: torch.nn.Module, quick: bool) -> torch.Tensor:
    return F.linear(
        _act(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias), quick), mlp.c_proj.weight, mlp.c_proj.bias
    )


def ref_maskclip(model: torch.nn.Module, x: torch.Tensor, quick: bool = False) -> torch.Tensor:
    """OpenCLIPWrapper.forward re-implemented: conv1, class token, the reference's pos interpolation (none when the
    token count is native), ln_pre, blocks, last block's value path only (``F.linear(...).chunk(3)[2]`` then
    out_proj), its MLP, ln_post @ proj, class token dropped. x: (B, 3, H, W) -> (B, H/16, W/16, D)."""
    v = model.visual
    b, _, img_h, img_w = x.shape
    t = F.conv2d(x, v.conv1.weight, stride=16).flatten(2).transpose(1, 2)  # (B, gh*gw, C)
    t = torch.cat([v.class_embedding.view(1, 1, -1).expand(b, 1, -1), t], dim=1)
    pos = v.positional_embedding
    t = t + (ref_clip_pos(pos, img_h, img_w, 16) if t.shape[1] != pos.shape[0] else pos)
    t = _ln(t, v.ln_pre)
    blocks = list(v.transformer.resblocks)
    for blk in blocks[:-1]:
        t = t + _attn(_ln(t, blk.ln_1), blk.attn)
        t = t + _mlp(_ln(t, blk.ln_2), blk.mlp, quick)
    last = blocks[-1]
    _, _, vals = F.linear(_ln(t, last.ln_1), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(
        3, dim=-1
    )
    t = t + F.linear(vals, last.attn.out_proj.weight, last.attn.out_proj.bias)
    t = t + _mlp(_ln(t, last.ln_2), last.mlp, quick)
    t = _ln(t, v.ln_post) @ v.proj
    return t[:, 1:].reshape(b, img_h // 16, img_w // 16, -1)


# ------------------------------------------------------------------------------------ item 1: CLIP pos-embed


def _naive_bicubic(grid: np.ndarray, dst: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Separable bicubic (Keys, A = -0.75, edge-clamped taps) with PyTorch's half-pixel mapping for a given
    scale: ``x_src = (x_dst + 0.5) / scale - 0.5``. grid: (sh, sw, C) -> (dh, dw, C)."""

    def kern(t: float) -> float:
        a, t = -0.75, abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    def weights(n_dst: int, n_src: int, s: float) -> np.ndarray:
        m = np.zeros((n_dst, n_src))
        for i in range(n_dst):
            x = (i + 0.5) / s - 0.5
            f = math.floor(x)
            for j in range(f - 1, f + 3):
                m[i, min(max(j, 0), n_src - 1)] += kern(x - j)
        return m

    wy = weights(dst[0], grid.shape[0], scale[0])
    wx = weights(dst[1], grid.shape[1], scale[1])
    return np.einsum("ys,sxc->yxc", wy, np.einsum("xt,stc->sxc", wx, grid))


@pytest.mark.parametrize(("src", "dst"), [((4, 4), (5, 7)), ((14, 14), (28, 42)), ((14, 14), (9, 31))])
def test_clip_pos_interpolation_is_scale_factor_g_plus_tenth(src, dst):
    g = torch.randn(src[0] * src[1], 6, dtype=torch.float64)
    ours = interpolate_grid_pos(g, src, dst, scale_offset=0.1).reshape(*dst, 6).numpy()
    scale = ((dst[0] + 0.1) / src[0], (dst[1] + 0.1) / src[1])
    naive = _naive_bicubic(g.reshape(*src, 6).numpy(), dst, scale)
    np.testing.assert_allclose(ours, naive, rtol=1e-5, atol=1e-5)  # computed in float32
    # the size-based resample (SigLIP2's) is a different function: the test can tell them apart
    by_size = interpolate_grid_pos(g, src, dst).reshape(*dst, 6).numpy()
    assert np.abs(by_size - naive).max() > 1e-3


def test_siglip_pos_interpolation_is_size_based():
    src, dst = (4, 4), (5, 7)
    g = torch.randn(16, 6, dtype=torch.float64)
    naive = _naive_bicubic(g.reshape(4, 4, 6).numpy(), dst, (dst[0] / src[0], dst[1] / src[1]))
    np.testing.assert_allclose(interpolate_grid_pos(g, src, dst).reshape(*dst, 6).numpy(), naive, atol=1e-5)


@pytest.mark.parametrize(("name", "size"), [("tiny-clip-224", (448, 672)), ("tiny-clip-64", (96, 160))])
def test_maskclip_matches_reference_forward(name, size):
    bb = build_backbone(name, seed=3)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bb.dense(x)
        ref = ref_maskclip(bb.model, x)
    r = rel(ours, ref)
    print(f"\n{name} {size[0]}x{size[1]}: relative difference to the reference forward {r:.2e}")
    assert r < 1e-5
    # the previous size-based resample is measurably off the reference's grid: the comparison can fail
    pos = bb.model.visual.positional_embedding.detach()
    by_size = interpolate_grid_pos(pos[1:], bb.native_grid, tuple(ours.shape[1:3]))
    assert rel(by_size, ref_clip_pos(pos, *size, 16)[1:]) > 1e-3


def test_maskclip_native_size_uses_pretrained_grid_unchanged():
    bb = build_backbone("tiny-clip-64", seed=1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel(bb.dense(x), ref_maskclip(bb.model, x)) < 1e-6


# --------------------------------------------------------------------------------------- item 3: QuickGELU


def test_quick_gelu_name_and_flag_match_reference_activation():
    qg = build_backbone("tiny-clip-224-quickgelu", seed=5)
    same = build_backbone("tiny-clip-224", seed=5, quick_gelu=True)
    plain = build_backbone("tiny-clip-224", seed=5)
    assert qg.name == same.name == "tiny-clip-224-quickgelu" and qg.quick_gelu and not plain.quick_gelu
    assert qg.weights_id == same.weights_id != plain.weights_id
    x = torch.randn(1, 3, 448, 672, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r_qg = rel(qg.dense(x), ref_maskclip(qg.model, x, quick=True))
        r_flag = rel(same.dense(x), ref_maskclip(same.model, x, quick=True))
        r_plain = rel(plain.dense(x), ref_maskclip(plain.model, x, quick=False))
        gap = rel(plain.dense(x), ref_maskclip(plain.model, x, quick=True))
    print(
        f"\nQuickGELU 448x672: rel diff {r_qg:.2e} (name), {r_flag:.2e} (flag), GELU {r_plain:.2e}; GELU vs "
        f"QuickGELU reference {gap:.2e}"
    )
    assert max(r_qg, r_flag, r_plain) < 1e-5
    assert gap > 1e-3  # the activation matters: a wrong one is caught


def test_quick_gelu_with_local_weights_file(tmp_path):
    src = build_backbone("tiny-clip-64", seed=7)
    path = tmp_path / "openai-like.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    gelu = build_backbone("tiny-clip-64", pretrained=str(path))
    quick = build_backbone("tiny-clip-64", pretrained=str(path), quick_gelu=True)
    by_name = build_backbone("tiny-clip-64-quickgelu", pretrained=str(path))
    assert quick.name == by_name.name == "tiny-clip-64-quickgelu"
    assert quick.weights_id == by_name.weights_id == gelu.weights_id + "+quickgelu"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert rel(quick.dense(x), ref_maskclip(src.model, x, quick=True)) < 1e-5
        assert rel(gelu.dense(x), ref_maskclip(src.model, x, quick=False)) < 1e-5


@pytest.mark.parametrize("name", ["tiny-clip-64", "ViT-S-16", "ViT-B-16"])
def test_quick_gelu_flag_name_rebuilds_the_same_tower(name):
    """``bb.name`` is what caches and students record: rebuilding from it gives the same QuickGELU tower."""
    a = build_backbone(name, quick_gelu=True, seed=4)
    b = build_backbone(a.name, seed=4)
    assert a.name.endswith("-quickgelu") and a.quick_gelu and b.quick_gelu
    assert (a.name, a.weights_id) == (b.name, b.weights_id)
    assert isinstance(b.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(a.dense(x), b.dense(x))


def test_openai_tag_turns_quick_gelu_on(monkeypatch):
    """The reference builds with ``quick_gelu="openai" in pretrained``; no download here: open_clip's
    create_model is stood in by one that records its arguments and builds the architecture randomly."""
    assert _tag_wants_quick_gelu("ViT-B-16", "openai")
    assert not _tag_wants_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")  # the paper's CLIP weights
    assert not _tag_wants_quick_gelu("ViT-B-16", None)
    seen = {}
    real = open_clip.create_model

    def fake(name, pretrained=None, **kw):
        seen.update(name=name, pretrained=pretrained, **kw)
        return real("ViT-S-16", pretrained=None, force_quick_gelu=kw.get("force_quick_gelu", False))

    monkeypatch.setattr(open_clip, "create_model", fake)
    bb = build_backbone("maskclip-vit-b16", pretrained="openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    assert bb.quick_gelu and bb.weights_id == "openclip:ViT-B-16:openai+quickgelu"
    assert isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    build_backbone("maskclip-vit-b16", pretrained="laion2b_s34b_b88k")
    assert seen["force_quick_gelu"] is False


# ----------------------------------------------------------------------------------- item 2: normalisation


@pytest.mark.parametrize(
    ("name", "tag", "mean", "std"),
    [
        ("ViT-B-16-SigLIP2-512", None, (0.5,) * 3, (0.5,) * 3),
        ("ViT-B-16-SigLIP2-512", "webli", (0.5,) * 3, (0.5,) * 3),
        ("ViT-B-16", None, CLIP_MEAN, CLIP_STD),
        ("ViT-B-16", "laion2b_s34b_b88k", CLIP_MEAN, CLIP_STD),
        ("ViT-B-16", "openai", CLIP_MEAN, CLIP_STD),
        ("ViT-L-14-CLIPA", None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        (None, None, CLIP_MEAN, CLIP_STD),  # tiny test towers
    ],
)
def test_family_normalisation_table(name, tag, mean, std):
    m, s = _family_mean_std(name, tag)
    np.testing.assert_allclose(m, mean)
    np.testing.assert_allclose(s, std)


@pytest.mark.parametrize("name", ["tiny-clip-64", "tiny-clip-224-quickgelu", "small-clip-224"])
def test_normalize_by_hand_for_clip_family(name, tmp_path):
    bb = build_backbone(name, pretrained=None)
    img = torch.randint(0, 256, (1, 5, 7, 3), dtype=torch.uint8)
    want = (img.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(bb.normalize(img), want)


def ref_siglip2(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SigLIP2Wrapper.forward re-implemented: timm patch embed, pos-embed resampled by *size* with
    ``F.interpolate(..., size=(ceil(H/16), ceil(W/16)), mode="bicubic")``, norm_pre, blocks, norm, then the
    attention pool's value path per head (``kv(x)`` split into heads, the v half), its proj, plus
    ``mlp(norm(v))``."""
    tr = model.visual.trunk
    b, _, img_h, img_w = x.shape
    t = (
        F.conv2d(x, tr.patch_embed.proj.weight, tr.patch_embed.proj.bias, stride=16)
        .flatten(2)
        .transpose(1, 2)
    )
    pos = tr.pos_embed
    side = math.isqrt(pos.shape[-2])
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(-(img_h // -16), -(img_w // -16)), mode="bicubic")
    t = t + pos.reshape(1, pos.shape[1], -1).permute(0, 2, 1)
    t = tr.norm(tr.blocks(tr.norm_pre(t)))
    pool = tr.attn_pool
    n, c = t.shape[1], t.shape[2]
    kv = pool.kv(t).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
    v = kv[1].transpose(1, 2).reshape(b, n, c)
    v = pool.proj(v)
    out = v + pool.mlp(pool.norm(v))
    return out.reshape(b, img_h // 16, img_w // 16, -1)


@pytest.mark.slow
@pytest.mark.ci
def test_siglip2_matches_reference_forward_non_square(siglip2):
    x = torch.randn(1, 3, 384, 640, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r = rel(siglip2.dense(x), ref_siglip2(siglip2.model, x))
    print(f"\nSigLIP2 B/16-512 384x640: relative difference to the reference forward {r:.2e}")
    assert r < 1e-5


@pytest.mark.slow
@pytest.mark.ci
def test_siglip2_from_local_file_keeps_half_normalisation(siglip2, tmp_path):
    assert siglip2.mean.flatten().tolist() == [0.5] * 3 and siglip2.std.flatten().tolist() == [0.5] * 3
    path = tmp_path / "siglip2.safetensors"
    save_file({k: v.contiguous() for k, v in siglip2.model.state_dict().items()}, str(path))
    loaded = build_backbone("siglip2-vit-b16-512", pretrained=str(path), seed=9)
    path.unlink()
    assert loaded.weights_id.startswith("sha256:")
    img = torch.randint(0, 256, (1, 32, 48, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded.normalize(img), img.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.dense(x), siglip2.dense(x))


# ----------------------------------------------------------------------------------------- item 8: SPAR-ALL


def _params_reached_by_gradient(bb, size: tuple[int, int]) -> set[str]:
    """Independent of set_trainable: make every parameter require grad, back-propagate one dense forward and
    return the parameters that received a non-zero gradient (what the reference's "all" actually trains)."""
    for p in bb.parameters():
        p.requires_grad_(True)
    bb.zero_grad(set_to_none=True)
    bb.dense(torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))).square().mean().backward()
    got = {n for n, p in bb.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    bb.zero_grad(set_to_none=True)
    return got


def test_spar_all_trains_exactly_what_the_readout_reaches():
    bb = build_backbone("tiny-clip-64", seed=2)
    reached = _params_reached_by_gradient(bb, (64, 96))
    assert set(bb.set_trainable("all")) == reached


@pytest.mark.slow
@pytest.mark.ci
def test_spar_all_siglip2_skips_the_bypassed_pool_query(siglip2):
    reached = _params_reached_by_gradient(siglip2, (32, 48))
    trainable = set(siglip2.set_trainable("all"))
    siglip2.set_trainable(0)
    assert trainable == reached
    assert "model.visual.trunk.attn_pool.latent" not in trainable
