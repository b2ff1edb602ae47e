"""The ingest PNG encoder: lossless for independent readers (PIL, webdataset's default decoder), deterministic,
no larger than PIL's PNG at the same deflate level on photographs."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.png import encode_png


def photo(h: int, w: int) -> np.ndarray:
    """A photograph from scikit-image cut to (h, w): smooth regions and edges, like ingest's output."""
    from skimage import data

    img = np.asarray(data.astronaut())  # (512, 512, 3)
    return np.ascontiguousarray(np.tile(img, (2, 2, 1))[:h, :w])


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (48, 80), (203, 131)])
@pytest.mark.parametrize("level", [0, 1, 3, 6])
def test_png_is_lossless_for_pil_and_deterministic(shape, level):
    a = np.random.default_rng(shape[0] * 31 + level).integers(0, 256, (*shape, 3), dtype=np.uint8)
    b = encode_png(a, level)
    with Image.open(io.BytesIO(b)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), a)
    assert encode_png(a.copy(), level) == b


def test_png_chunks_are_well_formed():
    a = photo(64, 96)
    b = encode_png(a, 1)
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    pos, tags = 8, []
    while pos < len(b):
        n = int.from_bytes(b[pos : pos + 4], "big")
        tag, body = b[pos + 4 : pos + 8], b[pos + 8 : pos + 8 + n]
        assert int.from_bytes(b[pos + 8 + n : pos + 12 + n], "big") == zlib.crc32(tag + body)
        tags.append(tag)
        pos += 12 + n
    assert tags == [b"IHDR", b"IDAT", b"IEND"]


def test_webdataset_default_decoder_reads_it():
    import webdataset as wds

    a = photo(96, 160)
    dec = wds.autodecode.Decoder([wds.autodecode.imagehandler("rgb8")])
    out = dec({"__key__": "k", "png": encode_png(a, 1)})
    np.testing.assert_array_equal(out["png"], a)


def test_size_is_close_to_pils_png_at_the_same_level():
    a = photo(700, 900)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    assert len(encode_png(a, 1)) <= 1.1 * len(buf.getvalue())
