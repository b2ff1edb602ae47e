"""DINOv3 dino.txt backbone: Meta's key layout, weight files, an independent forward, text, freezing, protocol.

The reference forward (tests/core/dinotxt_reference.py) is written from Meta's module definitions with plain
torch ops over the two state dicts as Meta publishes them; it shares no code with spar_core.backbones.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.config import EvalConfig
from pipeline.eval.model import resolve_protocol
from spar_core import build_backbone
from spar_core.backbones import BackboneError, list_backbones
from spar_core.backbones.dinotxt_model import DinoTxtSpec, build_dinotxt, meta_state_dicts
from tests.core.dinotxt_reference import ref_backbone_tokens, ref_head_tokens, ref_text

TINY = dict(dim=64, heads=4, reg=4, text_heads=4)


# ------------------------------------------------------------------------------------------ fixtures


def _randomised_files(tmp: Path, seed: int = 1) -> tuple[str, str, dict, dict]:
    """The tiny model's two Meta-layout files with every learnable tensor randomised (so biases, layer scales
    and norms all matter); ``periods`` and ``bias_mask`` keep their construction values."""
    g = torch.Generator().manual_seed(seed)
    bb_sd, head_sd = meta_state_dicts(build_dinotxt(DinoTxtSpec(**_tiny_spec_kwargs()), seed=0))
    out = []
    for sd in (bb_sd, head_sd):
        new = {}
        for k, v in sd.items():
            if k.endswith(("periods", "bias_mask")):
                new[k] = v.clone()
            elif k.endswith(
                ("norm1.weight", "norm2.weight", "norm.weight", "ln_final.weight", "_norm.weight")
            ):
                new[k] = 1 + 0.2 * torch.randn(v.shape, generator=g)
            elif k.endswith("gamma"):
                new[k] = 0.5 * torch.rand(v.shape, generator=g) + 0.1
            else:
                new[k] = 0.1 * torch.randn(v.shape, generator=g)
        out.append(new)
    pb, ph = (
        tmp / "dinov3_tiny_pretrain_x.pth",
        tmp / "dinov3_tiny_dinotxt_vision_head_and_text_encoder-x.pth",
    )
    torch.save(out[0], pb)
    torch.save(out[1], ph)
    return str(pb), str(ph), out[0], out[1]


def _tiny_spec_kwargs():
    from spar_core.backbones.dinov3txt import DINOTXT_BACKBONES

    s = DINOTXT_BACKBONES["tiny-dinov3txt"][0]
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _randomised_files(tmp_path_factory.mktemp("dinotxt"))


# ------------------------------------------------------------------------------------------ layout


def _meta_vitl_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released files, written out from Meta's module definitions: dinov3_vitl16
    (embed 1024, depth 24, 16 heads, ffn 4, qkv bias with LinearKMaskedBias, layer scale, 4 storage tokens,
    RoPE head dim 64) and DINOTxt(embed_dim 2048, 2 head blocks with SwiGLU align 64, text 1280/20/24)."""
    bb: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, 1024),
        "storage_tokens": (1, 4, 1024),
        "mask_token": (1, 1024),
        "patch_embed.proj.weight": (1024, 3, 16, 16),
        "patch_embed.proj.bias": (1024,),
        "rope_embed.periods": (16,),
        "norm.weight": (1024,),
        "norm.bias": (1024,),
    }
    for i in range(24):
        p = f"blocks.{i}."
        bb |= {p + "norm1.weight": (1024,), p + "norm1.bias": (1024,), p + "attn.qkv.weight": (3072, 1024),
               p + "attn.qkv.bias": (3072,), p + "attn.qkv.bias_mask": (3072,), p + "attn.proj.weight": (1024, 1024),
               p + "attn.proj.bias": (1024,), p + "ls1.gamma": (1024,), p + "norm2.weight": (1024,),
               p + "norm2.bias": (1024,), p + "mlp.fc1.weight": (4096, 1024), p + "mlp.fc1.bias": (4096,),
               p + "mlp.fc2.weight": (1024, 4096), p + "mlp.fc2.bias": (1024,), p + "ls2.gamma": (1024,)}  # fmt: skip
    sw = 2752  # int(4096 * 2 / 3) = 2730, rounded up to a multiple of 64
    hd: dict[str, tuple[int, ...]] = {"logit_scale": (1,)}
    for i in range(2):
        p = f"visual_model.head.blocks.{i}."
        hd |= {p + "norm1.weight": (1024,), p + "norm1.bias": (1024,), p + "attn.qkv.weight": (3072, 1024),
               p + "attn.proj.weight": (1024, 1024), p + "attn.proj.bias": (1024,), p + "ls1.gamma": (1024,),
               p + "norm2.weight": (1024,), p + "norm2.bias": (1024,), p + "mlp.w1.weight": (sw, 1024),
               p + "mlp.w1.bias": (sw,), p + "mlp.w2.weight": (sw, 1024), p + "mlp.w2.bias": (sw,),
               p + "mlp.w3.weight": (1024, sw), p + "mlp.w3.bias": (1024,), p + "ls2.gamma": (1024,)}  # fmt: skip
    hd |= {"visual_model.head.ln_final.weight": (1024,), "visual_model.head.ln_final.bias": (1024,)}
    t = "text_model.backbone."
    hd |= {t + "token_embedding.weight": (49408, 1280), t + "positional_embedding": (77, 1280),
           t + "ln_final.weight": (1280,), t + "ln_final.bias": (1280,),
           "text_model.head.linear_projection.weight": (2048, 1280)}  # fmt: skip
    for i in range(24):
        p = f"{t}blocks.{i}."
        hd |= {p + "attention_norm.weight": (1280,), p + "attention_norm.bias": (1280,),
               p + "attention.qkv.weight": (3840, 1280), p + "attention.proj.weight": (1280, 1280),
               p + "attention.proj.bias": (1280,), p + "ffn_norm.weight": (1280,), p + "ffn_norm.bias": (1280,),
               p + "feed_forward.fc1.weight": (5120, 1280), p + "feed_forward.fc1.bias": (5120,),
               p + "feed_forward.fc2.weight": (1280, 5120), p + "feed_forward.fc2.bias": (1280,)}  # fmt: skip
    return bb | {"HEAD:" + k: v for k, v in hd.items()}


def test_vitl16_key_layout_and_shapes_match_meta():
    m = build_dinotxt(DinoTxtSpec(), device="meta")  # shapes only
    bb, hd = meta_state_dicts(m)
    got = {k: tuple(v.shape) for k, v in bb.items()} | {"HEAD:" + k: tuple(v.shape) for k, v in hd.items()}
    want = _meta_vitl_layout()
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert got == want
    assert sum(math.prod(s) for k, s in want.items() if not k.startswith("HEAD:")) == 303_227_920


def test_registry_and_attributes():
    assert {"dinov3txt-vitl16", "tiny-dinov3txt"} <= set(list_backbones())
    bb = build_backbone("tiny-dinov3txt")
    assert (bb.readout, bb.patch_size, bb.dim, bb.native_size, bb.num_blocks) == (
        "dinotxt-backbone-patch", 16, 64, 64, 4)  # fmt: skip
    torch.testing.assert_close(bb.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(bb.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert bb.weights_id == "random:tiny-dinov3txt:seed0"
    assert not any(p.requires_grad for p in bb.parameters())
    # seeded: same seed -> same weights, other seed -> other weights
    a, b, c = (build_backbone("tiny-dinov3txt", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.visual_model.backbone.blocks.0.attn.qkv.weight"],
                           c["model.visual_model.backbone.blocks.0.attn.qkv.weight"])  # fmt: skip
    # Meta's init of the masked key bias: ones, zeros for the key third
    mask = a["model.visual_model.backbone.blocks.0.attn.qkv.bias_mask"]
    assert mask.tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64


# ------------------------------------------------------------------------------------------ weights


def test_random_weights_saved_in_meta_layout_load_back_bit_exactly(tmp_path):
    src = build_dinotxt(DinoTxtSpec(**_tiny_spec_kwargs()), seed=5)
    bb_sd, head_sd = meta_state_dicts(src)
    assert not any(k.startswith(("visual_model", "text_model")) for k in bb_sd)
    torch.save(bb_sd, tmp_path / "b.pth")
    torch.save(head_sd, tmp_path / "h.pth")
    bb = build_backbone("tiny-dinov3txt", pretrained=f"{tmp_path / 'b.pth'},{tmp_path / 'h.pth'}")
    assert bb.weights_id.startswith("sha256:")
    got_bb, got_head = meta_state_dicts(bb.model)
    for want, got in ((bb_sd, got_bb), (head_sd, got_head)):
        assert set(want) == set(got)
        for k in want:
            assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k


def test_vocabulary_file_as_third_item(tmp_path, files):
    import open_clip

    pb, ph, _, _ = files
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    mine = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    mine.write_bytes(vocab.read_bytes())
    a = build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph},{mine}")
    b = build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph}")
    assert a.weights_id == b.weights_id
    assert torch.equal(a.tokenize(["a photo of a cat"]), b.tokenize(["a photo of a cat"]))
    with pytest.raises(BackboneError, match="cannot read BPE vocabulary file"):
        build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph},{tmp_path / 'missing.txt.gz'}")


def test_bad_weight_files_name_the_keys(tmp_path, files):
    pb, ph, bsd, hsd = files
    with pytest.raises(BackboneError, match="pass the backbone file first"):
        build_backbone("tiny-dinov3txt", pretrained=f"{ph},{pb}")
    missing = dict(bsd)
    del missing["blocks.1.attn.qkv.bias_mask"]
    torch.save(missing | {"extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(
        BackboneError, match=r"missing \(e.g. \['blocks.1.attn.qkv.bias_mask'\]\).*extra.weight"
    ):
        build_backbone("tiny-dinov3txt", pretrained=f"{tmp_path / 'bad.pth'},{ph}")
    torch.save({k: v for k, v in hsd.items() if not k.startswith("text_model.head")}, tmp_path / "h2.pth")
    with pytest.raises(BackboneError, match="text_model.head.linear_projection.weight"):
        build_backbone("tiny-dinov3txt", pretrained=f"{pb},{tmp_path / 'h2.pth'}")
    wrong = dict(bsd) | {"cls_token": torch.zeros(1, 1, 32)}
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(BackboneError, match=r"cls_token has shape \(1, 1, 32\)"):
        build_backbone("tiny-dinov3txt", pretrained=f"{tmp_path / 'shape.pth'},{ph}")
    with pytest.raises(BackboneError, match="weights file not found"):
        build_backbone("tiny-dinov3txt", pretrained=f"{tmp_path / 'nope.pth'},{ph}")
    for bad in (str(tmp_path / "one-file.pth"), f"{pb},", f"{pb},{ph},{ph},{ph}"):
        with pytest.raises(BackboneError, match="BACKBONE.pth,HEAD.pth"):
            build_backbone("tiny-dinov3txt", pretrained=bad)
    # logit_scale is the one tensor a head file may leave out
    torch.save({k: v for k, v in hsd.items() if k != "logit_scale"}, tmp_path / "h3.pth")
    build_backbone("tiny-dinov3txt", pretrained=f"{pb},{tmp_path / 'h3.pth'}")


class _Evil:
    """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path, files):
    pb, ph, bsd, _ = files
    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        build_backbone("tiny-dinov3txt", pretrained=f"{tmp_path / 'evil.pth'},{ph}")


# ------------------------------------------------------------------------------------------ forward parity


@pytest.mark.parametrize("size", [(48, 80), (96, 64), (64, 64), (112, 48)])
def test_dense_equals_independent_forward(files, size):
    pb, ph, bsd, hsd = files
    bb = build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph}")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
    gh, gw = size[0] // 16, size[1] // 16
    with torch.no_grad():
        ours = bb.dense(x)
        ref = ref_backbone_tokens(bsd, x, TINY["heads"], TINY["reg"])[:, 1 + TINY["reg"] :].reshape(
            2, gh, gw, -1
        )
    assert ours.shape == (2, gh, gw, 64)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_head_readout_equals_independent_forward(files):
    pb, ph, bsd, hsd = files
    bb = build_backbone("tiny-dinov3txt-head", pretrained=f"{pb},{ph}")
    assert bb.readout == "dinotxt-head-patch"
    x = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = bb.dense(x)
        tokens = ref_backbone_tokens(bsd, x, TINY["heads"], TINY["reg"])
        ref = ref_head_tokens(hsd, tokens, TINY["heads"])[:, 1 + TINY["reg"] :].reshape(1, 5, 3, -1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_non_multiple_sizes_are_stretched_bicubically_like_the_reference(files):
    pb, ph, bsd, _ = files
    bb = build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph}")
    x = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = bb.dense(x)
        stretched = F.interpolate(x, size=(64, 80), mode="bicubic", align_corners=False)  # ceil to 16
        ref = ref_backbone_tokens(bsd, stretched, TINY["heads"], TINY["reg"])[:, 5:].reshape(1, 4, 5, -1)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_training_mode_rescales_rope_coordinates_per_block_like_meta(files):
    """Meta's RoPE in training mode (as the reference's Lightning student runs): each block's call draws a
    log-uniform coordinate factor in [1/2, 2] from the global RNG; eval mode is deterministic."""
    pb, ph, bsd, _ = files
    bb = build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph}").train()
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.manual_seed(7)
        ours = bb.dense(x)
        torch.manual_seed(7)
        scales = [float(torch.empty(1).uniform_(-math.log(2), math.log(2)).exp()) for _ in range(4)]
        ref = ref_backbone_tokens(bsd, x, TINY["heads"], TINY["reg"], coord_scales=scales)[:, 5:].reshape(
            ours.shape
        )
        plain = bb.eval().dense(x)
    assert len(set(scales)) == 4 and all(0.5 <= s <= 2 for s in scales)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_text_embeddings_equal_independent_forward(files):
    pb, ph, _, hsd = files
    bb = build_backbone("tiny-dinov3txt", pretrained=f"{pb},{ph}")
    texts = ["a photo of a dog.", "a bad photo of the large traffic light, at night", "cat"]
    ids = bb.tokenize(texts)
    with torch.no_grad():
        ours = bb.encode_text(texts)
        ref = ref_text(hsd, ids, TINY["text_heads"])
    assert ours.shape == (3, 64)  # the image-patch half of the 128-d output
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_tokenizer_is_clip_bpe():
    bb = build_backbone("tiny-dinov3txt")
    ids = bb.tokenize(["a photo of a dog.", "x " * 100])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    # CLIP BPE ids (bpe_simple_vocab_16e6): <start>=49406, a=320, photo=1125, of=539, dog=1929, .=269, <end>=49407
    assert ids[0, :9].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0]
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncated, end token kept last


# ------------------------------------------------------------------------------------------ training interface


def test_set_trainable_freezes_like_the_reference():
    bb = build_backbone("tiny-dinov3txt")
    names = bb.set_trainable(2)
    # the reference unfreezes visual_model.backbone.blocks[-1], [-2] ("blk_-1,blk_-2"); head and text stay frozen
    assert names and all(n.startswith(("model.visual_model.backbone.blocks.2.",
                                       "model.visual_model.backbone.blocks.3.")) for n in names)  # fmt: skip
    assert any(".blocks.2." in n for n in names) and any(".blocks.3." in n for n in names)
    sd = {k: v + 1 for k, v in bb.trainable_state_dict().items()}
    other = build_backbone("tiny-dinov3txt", seed=0)
    other.load_trainable_state_dict(sd)
    assert torch.equal(other.state_dict()[names[0]], sd[names[0]])
    assert bb.set_trainable(0) == []
    with pytest.raises(BackboneError):
        bb.set_trainable(5)


@pytest.mark.parametrize("name", ["tiny-dinov3txt", "tiny-dinov3txt-head"])
def test_spar_all_trains_exactly_what_the_readout_reaches(name):
    """ "all" unfreezes exactly the parameters that receive a gradient from the dense features (found here by a
    backward pass with everything unfrozen): the backbone, plus the vision head for the head readout."""
    bb = build_backbone(name)
    for p in bb.parameters():
        p.requires_grad_(True)
    bb.dense(torch.randn(1, 3, 64, 96)).square().sum().backward()
    reached = {n for n, p in bb.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(bb.set_trainable("all")) == reached
    assert any(".head." in n for n in reached) == name.endswith("-head")


def test_gradients_reach_only_the_trainable_blocks():
    bb = build_backbone("tiny-dinov3txt")
    bb.set_trainable(1)
    bb.dense(torch.randn(1, 3, 32, 48)).square().mean().backward()
    grads = {n for n, p in bb.named_parameters() if p.grad is not None}
    assert grads and all(".backbone.blocks.3." in n for n in grads)


def test_precast_for_autocast_is_bit_identical_under_autocast():
    x = torch.randn(1, 3, 48, 64)
    a = build_backbone("tiny-dinov3txt")
    b = build_backbone("tiny-dinov3txt").precast_for_autocast(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(a.dense(x), b.dense(x))


# ------------------------------------------------------------------------------------------ eval protocol


@pytest.mark.parametrize(
    "dataset, scale, prob, area, short",
    [  # the reference's configs/dinov3txt/cfg_*.py (defaults: logit_scale 40, prob_thd 0, no area_thd)
        ("voc21", 65.0, 0.0, 0.0, 672),
        ("voc20", 40.0, 0.0, 0.0, 672),
        ("context60", 50.0, 0.1, 0.0, 672),
        ("context59", 40.0, 0.0, 0.0, 672),
        ("cityscapes", 40.0, 0.0, 0.0, 1024),
        ("ade20k", 40.0, 0.0, 0.0, 672),
    ],
)
def test_eval_protocol_matches_the_reference_configs(dataset, scale, prob, area, short):
    p = resolve_protocol(EvalConfig(dataset=dataset), "dinotxt-backbone-patch", 384, 16)
    assert (p.logit_scale, p.prob_thd, p.area_thd, p.short_side, p.long_side, p.crop) == (
        scale, prob, area, short, 2048, 384)  # fmt: skip
