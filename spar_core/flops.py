"""Analytic FLOPs of a ViT backbone's dense forward (2 per multiply-add), from its architecture alone: what the
benchmarks compare measured rates against and what ``loader_workers = "auto"`` sizes a training step by."""

from __future__ import annotations

from dataclasses import dataclass

from spar_core.backbones import Backbone

__all__ = ["ViTArch", "SIGLIP2_B16_512", "vit_arch", "vit_dense_flops"]


@dataclass(frozen=True)
class ViTArch:
    """What the FLOP count of a dense forward depends on."""

    depth: int  # transformer blocks
    width: int  # token width d
    mlp: int  # MLP hidden width m
    patch: int  # patch size p
    dim: int  # output feature dim D
    prefix: int  # class/prefix tokens
    readout: str  # "maskclip" or "siglip2-pool-bypass"
    pool_mlp: int = 0  # hidden width of the attention pool's MLP (pool-bypass readout), 0 = none


# open_clip ViT-B-16-SigLIP2-512 (timm vit_base_patch16_siglip_512): checked against the built model in the tests
SIGLIP2_B16_512 = ViTArch(12, 768, 3072, 16, 768, 0, "siglip2-pool-bypass", 3072)


def vit_arch(bb: Backbone) -> ViTArch:
    """The :class:`ViTArch` of a built backbone (open_clip CLIP tower or timm SigLIP tower)."""
    if bb.readout == "maskclip":
        vis = bb.model.visual
        blocks = list(vis.transformer.resblocks)
        return ViTArch(
            depth=len(blocks),
            width=int(vis.conv1.out_channels),
            mlp=int(blocks[0].mlp.c_fc.out_features),
            patch=bb.patch_size,
            dim=bb.dim,
            prefix=1,
            readout="maskclip",
        )
    tr = bb.trunk
    pool = tr.attn_pool
    return ViTArch(
        depth=len(tr.blocks),
        width=int(tr.embed_dim),
        mlp=int(tr.blocks[0].mlp.fc1.out_features),
        patch=bb.patch_size,
        dim=bb.dim,
        prefix=int(tr.num_prefix_tokens),
        readout=bb.readout,
        pool_mlp=int(pool.mlp.fc1.out_features) if pool.mlp is not None else 0,
    )


def vit_dense_flops(arch: ViTArch, height: int, width: int) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one dense forward over an ``height x width`` image.

    With N tokens, width d, MLP hidden m, per full block: qkv 3Nd^2 + scores N^2 d + weighted sum N^2 d +
    out-proj Nd^2 + MLP 2Ndm multiply-adds (= 24 N d^2 + 4 N^2 d FLOPs at m = 4d). The MaskCLIP last block keeps
    only the value path (v + out-proj 2Nd^2 + MLP) and projects all N tokens (N d D); the SigLIP pool bypass
    runs every block in full, then the pool's value (N d^2) and output projections (N d D) and its MLP (2 N D m').
    Plus the patch embedding N_p (3 p^2) d. Norms, activations, position-embedding interpolation are not counted
    (they are O(N d), under 1%).
    """
    p, d, m = arch.patch, arch.width, arch.mlp
    n_p = (height // p) * (width // p)
    n = n_p + arch.prefix
    full = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    macs = n_p * 3 * p * p * d
    if arch.readout == "maskclip":
        macs += (arch.depth - 1) * full + 2 * n * d * d + 2 * n * d * m + n * d * arch.dim
        attn = (arch.depth - 1) * 2 * n * n * d
    else:
        macs += arch.depth * full + n * d * d + n * d * arch.dim + 2 * n * arch.dim * arch.pool_mlp
        attn = arch.depth * 2 * n * n * d
    return {"flops": 2.0 * macs, "attention_flops": 2.0 * attn}
