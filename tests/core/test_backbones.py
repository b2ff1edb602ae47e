"""Backbones: any-resolution dense features, readouts against open_clip/timm's own modules, freezing, weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from spar_core import build_backbone, distill_loss, trainable_parameters
from spar_core.backbones import BackboneError, interpolate_grid_pos


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny-clip-64", seed=0)


@pytest.mark.parametrize("size", [(64, 96), (224, 448), (512, 1024)])
def test_dense_any_resolution(tiny, size):
    with torch.no_grad():
        f = tiny.dense(torch.randn(1, 3, *size))
    assert f.shape == (1, size[0] // 16, size[1] // 16, tiny.dim)
    assert torch.isfinite(f).all()


def _maskclip_reference(bb, x):
    """open_clip's own modules: its embedding path (no interpolation at the native size) and the last block's
    own forward with an attention mask that lets every token attend only to itself, which is the value path."""
    v = bb.model.visual
    t = v._embeds(x)
    for blk in v.transformer.resblocks[:-1]:
        t = blk(t)
    n = t.shape[1]
    diag_only = torch.full((n, n), float("-inf"))
    diag_only.fill_diagonal_(0.0)
    t = v.transformer.resblocks[-1](t, attn_mask=diag_only)
    t = v.ln_post(t) @ v.proj
    g = x.shape[-1] // 16
    return t[:, 1:].reshape(x.shape[0], g, g, -1)


def test_maskclip_equals_native_forward(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tiny.dense(x), _maskclip_reference(tiny, x), atol=1e-5, rtol=1e-5)


def test_maskclip_vitb16_native():
    bb = build_backbone("maskclip-vit-b16")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bb.dense(x), _maskclip_reference(bb, x), atol=1e-4, rtol=1e-4)
    assert (bb.patch_size, bb.dim, bb.native_size, bb.readout) == (16, 512, 224, "maskclip")


def test_siglip2_pool_bypass_equals_timm_pool_per_token(siglip2):
    bb = siglip2
    assert (bb.patch_size, bb.dim, bb.native_size) == (16, 768, 512)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ours = bb.dense(x)
        trunk = bb.model.visual.trunk
        tokens = trunk.forward_features(x)  # timm's own embedding (no interpolation at 512) + blocks + norm
        b, n, c = tokens.shape
        # The attention pool over a single key returns that key's value path: the bypass, per token.
        ref = trunk.attn_pool(tokens.reshape(b * n, 1, c)).reshape(b, 32, 32, -1)
        ref = bb.model.visual.head(ref)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert bb.dense(torch.randn(1, 3, 64, 96)).shape == (1, 4, 6, 768)


def test_pos_interpolation_identity_and_shape():
    g = torch.randn(16, 8)
    assert interpolate_grid_pos(g, (4, 4), (4, 4)) is g
    assert interpolate_grid_pos(g, (4, 4), (6, 3)).shape == (18, 8)
    const = torch.ones(16, 8) * 0.5
    torch.testing.assert_close(interpolate_grid_pos(const, (4, 4), (7, 9)), torch.full((63, 8), 0.5))


@pytest.mark.parametrize("k", [0, 1, 2, "all"])
def test_freezing_exactly_last_k_blocks(k):
    bb = build_backbone("tiny-clip-64")
    params = trainable_parameters(bb, k)
    names = {n for n, p in bb.named_parameters() if p.requires_grad}
    if k == "all":  # SPAR-ALL: the whole image tower, the text tower frozen
        visual = {n for n, _ in bb.named_parameters() if n.startswith("model.visual.")}
        assert names == visual and len(params) == len(visual) > 4 * 12
        return
    expected = {
        n
        for n, _ in bb.named_parameters()
        if any(n.startswith(f"model.visual.transformer.resblocks.{i}.") for i in range(4 - k, 4))
    }
    assert names == expected
    assert len(params) == len(expected)


def test_training_step_changes_only_last_blocks():
    bb = build_backbone("tiny-clip-64")
    params = trainable_parameters(bb, 2)
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(1, 3, 64, 96)
    loss = distill_loss(bb.dense(x), torch.zeros(1, 4, 6, bb.dim))
    loss.backward()
    opt.step()
    changed = {n for n, p in bb.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing changed"
    assert all(
        n.startswith(("model.visual.transformer.resblocks.2.", "model.visual.transformer.resblocks.3."))
        for n in changed
    )


def test_set_trainable_bad_values():
    bb = build_backbone("tiny-clip-64")
    with pytest.raises(BackboneError, match="has 4"):
        bb.set_trainable(5)
    with pytest.raises(BackboneError, match="int >= 0 or 'all'"):
        bb.set_trainable(-1)


def test_distill_loss_hand_computed():
    s = torch.tensor([[[[1.0, 2.0]]]])
    t = torch.tensor([[[[0.0, 4.0]]]])
    assert float(distill_loss(s, t)) == pytest.approx((1 + 4) / 2)
    with pytest.raises(BackboneError, match="differ in shape"):
        distill_loss(s, torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_round_trip(tmp_path, suffix):
    src = build_backbone("tiny-clip-64", seed=7)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    loaded = build_backbone(
        "tiny-clip-64", pretrained=str(path), seed=0
    )  # a different seed: weights must win
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(loaded.dense(x), src.dense(x))
    assert loaded.weights_id.startswith("sha256:")
    other = build_backbone("tiny-clip-64", pretrained=str(path))
    assert other.weights_id == loaded.weights_id != build_backbone("tiny-clip-64", seed=7).weights_id


def test_weights_file_errors(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("tiny-clip-64", pretrained=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a weights file")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        build_backbone("tiny-clip-64", pretrained=str(bad))
    other = build_backbone("tiny-clip-224")
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(wrong))
    with pytest.raises(BackboneError, match="does not match"):
        build_backbone("tiny-clip-64", pretrained=str(wrong))


def test_malicious_pickle_weights_not_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(BackboneError):
        build_backbone("tiny-clip-64", pretrained=str(path))
    assert not marker.exists()


def test_unknown_backbone_and_bad_input(tiny):
    with pytest.raises(BackboneError, match="unknown backbone 'resnet-9000'"):
        build_backbone("resnet-9000")
    with pytest.raises(BackboneError, match="3 colour channels"):
        tiny.dense(torch.randn(1, 1, 64, 64))
    with pytest.raises(BackboneError, match="not a positive multiple of the patch size 16"):
        tiny.dense(torch.randn(1, 3, 64, 70))


def test_encode_text_and_normalize(tiny):
    e = tiny.encode_text(["a photo of a cat", "a photo of a dog"])
    assert e.shape == (2, tiny.dim)
    img = torch.randint(0, 256, (1, 32, 48, 3), dtype=torch.uint8)
    x = tiny.normalize(img)
    assert x.shape == (1, 3, 32, 48)
    expected = (img[0, 5, 7, 1] / 255.0 - tiny.mean[0, 1, 0, 0]) / tiny.std[0, 1, 0, 0]
    assert float(x[0, 1, 5, 7]) == pytest.approx(float(expected), abs=1e-6)


def test_core_is_pure():
    """spar_core imports no storage, distribution, tracking or network libraries (checked in a fresh process)."""
    code = (
        "import sys, spar_core, spar_core.backbones, spar_core.sliding, spar_core.distill, spar_core.segment,"
        " spar_core.metrics\n"
        "bad = [m for m in ('ray', 'mlflow', 'zarr', 'webdataset', 'fsspec', 's3fs', 'pyarrow', 'boto3', 'botocore',"
        " 'pipeline', 'requests') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    # and no I/O modules in its own source
    import ast
    import pathlib

    import spar_core

    banned = {
        "os",
        "pathlib",
        "shutil",
        "io",
        "socket",
        "urllib",
        "http",
        "subprocess",
        "tarfile",
        "zipfile",
        "ray",
        "mlflow",
        "zarr",
        "webdataset",
        "fsspec",
        "pyarrow",
        "requests",
    }
    for src in pathlib.Path(spar_core.__file__).parent.glob("*.py"):
        tree = ast.parse(src.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in banned, f"{src.name} imports {n}"


def test_weights_hash_is_sha256_of_names_dtypes_shapes_and_bytes_in_sorted_order():
    """The weights id of a file (``sha256:…``, part of every cache fingerprint) must never change: hand-made hash of
    the documented layout, bf16 and empty tensors included."""
    import hashlib

    from spar_core.backbones.base import state_dict_sha256

    g = torch.Generator().manual_seed(0)
    sd = {"b.w": torch.randn(3, 4, generator=g), "a.bf": torch.randn(5, generator=g).bfloat16(),
          "c.empty": torch.zeros(0), "d.t": torch.randn(4, 3, generator=g).t()}  # fmt: skip
    h = hashlib.sha256()
    for name in ("a.bf", "b.w", "c.empty", "d.t"):
        t = sd[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(bytes(t.contiguous().view(-1).view(torch.uint8).tolist()))
    assert state_dict_sha256(sd) == h.hexdigest()
