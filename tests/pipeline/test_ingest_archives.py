"""Ingest straight from tar archives in SA-1B's member layout (``sa_N.jpg`` + ``sa_N.json``), and the authors'
``--select paper`` selection, checked against their download script run by bash on the extracted archives."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.archives import archive_sources, list_archive_members, paper_selection
from pipeline.data.config import IngestConfig, IngestError
from pipeline.data.imageset import open_imageset
from pipeline.data.ingest import ingest

SMALL = dict(target_long=128, target_short=96, min_short=64, shard_size=3)

# the authors' selection step (sa1b_download.sh at 0f63ff2, run per archive after extracting it without json)
AUTHORS_FILTER = r"""
OUTPUT_DIR="$1"; MAX_INDEX=25000
find "$OUTPUT_DIR" -type f -name "sa_*.jpg" | while read -r file; do
    base=$(basename "$file"); num=${base#sa_}; num=${num%%.*}; num=$((10#$num))
    if (( num > MAX_INDEX )); then rm -f "$file"; fi
done
"""


def jpeg(seed: int, h: int = 72, w: int = 104) -> bytes:
    """A small smooth RGB JPEG (a gradient plus noise: decodable, different per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([yy * 3 + seed, xx * 2, (yy + xx) % 256], -1) + rng.integers(0, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sa_archive(path: Path, members: list[tuple[str, bytes]]) -> dict[str, tuple[int, int]]:
    """Write ``path`` as SA-1B lays its archives out; returns {member: (data offset, size)} from tarfile."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def sa_members(indices: list[int], prefix: str = "") -> list[tuple[str, bytes]]:
    """``sa_N.jpg`` + ``sa_N.json`` (the annotation, a few hundred bytes here) per index."""
    out = []
    for i in indices:
        out.append((f"{prefix}sa_{i}.jpg", jpeg(i)))
        out.append(
            (f"{prefix}sa_{i}.json", json.dumps({"image": {"image_id": i}, "annotations": []}).encode())
        )
    return out


PAPER_SETS = {  # archive -> image indices (the real ones hold ~11k each; the cut at 25,000 falls in sa_000002)
    "sa_000000.tar": [1, 2, 7, 11],
    "sa_000001.tar": [12000, 13001],
    "sa_000002.tar": [24999, 25000, 25001, 30000],
    "sa_000003.tar": [33000, 5],  # not one of the authors' archives: nothing from it, even index <= 25,000
}


@pytest.fixture(scope="module")
def paper_archives(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sa1b")
    for name, idx in PAPER_SETS.items():
        prefix = "./" if name == "sa_000001.tar" else ""  # both spellings of a top-level member
        extra = [("sa_100.JPG", jpeg(100))] if name == "sa_000000.tar" else []  # find -name is case-sensitive
        sa_archive(d / name, sa_members(idx, prefix) + extra)
    return d


def authors_selection(archives: Path, work: Path) -> set[str]:
    """What the authors' pipeline trains on: each archive extracted by GNU tar without json, their filter run by
    bash, then the file names their ImageOnlyDataset lists (.jpg/.png, lower-cased)."""
    out = work / "raw_images"
    out.mkdir(parents=True)
    for idx in (0, 1, 2):
        subprocess.run(["tar", "-xf", str(archives / f"sa_{idx:06d}.tar"), "-C", str(out), "--exclude=*.json"],
                       check=True)  # fmt: skip
        subprocess.run(["bash", "-euo", "pipefail", "-c", AUTHORS_FILTER, "filter", str(out)], check=True)
    return {p.name for p in out.iterdir() if p.name.lower().endswith((".jpg", ".png"))}


def test_paper_selection_is_the_authors_download_script(paper_archives, tmp_path):
    if not (shutil.which("tar") and shutil.which("bash")):
        pytest.skip("needs GNU tar and bash to run the authors' script")
    expected = authors_selection(paper_archives, tmp_path)
    assert expected == {"sa_1.jpg", "sa_2.jpg", "sa_7.jpg", "sa_11.jpg", "sa_100.JPG", "sa_12000.jpg",
                        "sa_13001.jpg", "sa_24999.jpg", "sa_25000.jpg"}  # fmt: skip
    pairs, where = archive_sources(sorted(str(p) for p in paper_archives.glob("*.tar")), select="paper")
    assert sorted(Path(rel).name for _, rel in pairs) == sorted(expected)
    assert all(src.startswith("tar://") and src in where for src, _ in pairs)
    pairs_all, _ = archive_sources([str(paper_archives / "sa_00000*.tar")])  # a glob; no selection
    assert len(pairs_all) == sum(len(v) for v in PAPER_SETS.values()) + 1  # every image, no json
    assert paper_selection(["sa_1.json", "x/sa_25001.jpg", "notes.txt", "a.png"]) == ["a.png"]


def test_archive_ingest_equals_ingest_of_the_extracted_images(ray_up, paper_archives, tmp_path):
    cfg = IngestConfig(**SMALL, select="paper")
    s = ingest([str(paper_archives / f"sa_00000{i}.tar") for i in range(4)], str(tmp_path / "a"), cfg,
               workers=2, progress=False)  # fmt: skip
    assert (s.num_inputs, s.accepted, s.rejected) == (9, 9, 0), s.line()
    ims = open_imageset(str(tmp_path / "a"))
    # the bytes each sample was made from are the member's bytes as written into the archive
    written = {n.removeprefix("./"): d for a in paper_archives.glob("*.tar") for n, d in _members(a)}
    for i in range(ims.num_shards):
        with tarfile.open(ims.shard_url(i)) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    name = meta["source"].split("::")[0].removeprefix("tar://").removeprefix("./")
                    assert meta["source_sha256"] == hashlib.sha256(written[name]).hexdigest()
    # the same images as plain files give the same samples: keys, sizes, augmentation and pixels
    plain = tmp_path / "plain"
    plain.mkdir()
    for r in ims.records:
        name = r.source.split("::")[0].removeprefix("tar://").removeprefix("./")
        (plain / name).write_bytes(written[name])
    ref = ingest(str(plain), str(tmp_path / "b"), IngestConfig(**SMALL), workers=2, progress=False)

    # (the fingerprint also covers shard numbers, which follow the input order: archive order vs sorted names)
    def per_key(ims_):
        return {r.key: (r.height, r.width, r.pixel_sha256, r.augmentation) for r in ims_.records}

    assert per_key(open_imageset(ref.root)) == per_key(ims)
    assert sorted(r.key for r in ims.records) == sorted(
        ["sa_1", "sa_2", "sa_7", "sa_11", "sa_100", "sa_12000", "sa_13001", "sa_24999", "sa_25000"]
    )


def _members(archive: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(archive) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


def test_truncated_archives_and_a_corrupt_member_are_listed_nothing_else_lost(ray_up, tmp_path):
    members = sa_members([1, 2, 3, 4])
    members[2] = ("sa_2.jpg", jpeg(2)[:-600])  # a JPEG whose headers parse but whose scan data stops short
    full = sa_archive(tmp_path / "whole.tar", members)
    raw = (tmp_path / "whole.tar").read_bytes()
    # cut inside sa_3.jpg's data: sa_3 is truncated, sa_4 is missing entirely (its header is gone)
    off3, size3 = full["sa_3.jpg"]
    (tmp_path / "cut_data.tar").write_bytes(raw[: off3 + size3 // 2])
    # cut 100 bytes into sa_4.jpg's header: sa_1..sa_3 complete, the tail unreadable
    off4 = full["sa_4.jpg"][0] - 512
    (tmp_path / "cut_header.tar").write_bytes(raw[: off4 + 100])
    cut_data = list_archive_members(str(tmp_path / "cut_data.tar"))
    assert [(n, loc.available < loc.size) for n, loc in cut_data][-1] == ("sa_3.jpg", True)
    assert list_archive_members(str(tmp_path / "cut_header.tar"))[-1][1].tail

    srcs = [str(tmp_path / n) for n in ("whole.tar", "cut_data.tar", "cut_header.tar")]
    s = ingest(srcs, str(tmp_path / "out"), IngestConfig(**SMALL), workers=2, progress=False)
    ims = open_imageset(str(tmp_path / "out"))
    rejected = pq.read_table(tmp_path / "out" / "images" / "rejected.parquet").to_pylist()
    by_archive = {}
    for r in rejected:
        by_archive.setdefault(r["source"].rsplit("/", 1)[-1], []).append(r["reason"].split(":", 1)[0])
    assert sorted(by_archive["whole.tar"]) == ["corrupt"]
    assert sorted(by_archive["cut_data.tar"]) == ["corrupt", "truncated"]
    assert sorted(by_archive["cut_header.tar"]) == ["corrupt"]
    assert by_archive[f"cut_header.tar@{off4}"] == ["truncated_archive"]
    assert any("sa_3.jpg" in r["source"] and "truncated" in r["reason"] for r in rejected)
    assert all("sa_2.jpg" in r["source"] for r in rejected if r["reason"].startswith("corrupt"))
    # every complete, decodable image is in: sa_1, sa_3, sa_4 of the whole archive, sa_1 of cut_data,
    # sa_1 and sa_3 of cut_header (duplicate names across archives get -2, -3 keys)
    assert (s.accepted, s.rejected) == (6, 5), s.line()
    sources = sorted(r.source.split("::")[0] + "@" + r.source.rsplit("/", 1)[-1] for r in ims.records)
    assert sources == sorted(
        [f"tar://sa_{i}.jpg@whole.tar" for i in (1, 3, 4)]
        + ["tar://sa_1.jpg@cut_data.tar"]
        + [f"tar://sa_{i}.jpg@cut_header.tar" for i in (1, 3)]
    )


def test_bad_archive_inputs_are_clear_errors(paper_archives, tmp_path):
    (tmp_path / "notes.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(IngestError, match=r"notes\.tar: not a tar archive"):
        ingest(str(tmp_path / "notes.tar"), str(tmp_path / "o"), IngestConfig(**SMALL), progress=False)
    with pytest.raises(IngestError, match=r"missing: sa_000002\.tar"):
        ingest([str(paper_archives / "sa_000000.tar"), str(paper_archives / "sa_000001.tar")],
               str(tmp_path / "o"), IngestConfig(**SMALL, select="paper"), progress=False)  # fmt: skip
    with pytest.raises(IngestError, match="tar archives only"):
        ingest([str(paper_archives / "sa_000000.tar"), str(tmp_path)], str(tmp_path / "o"),
               IngestConfig(**SMALL, select="paper"), progress=False)  # fmt: skip
    with pytest.raises(IngestError, match=r"nope\.tar: no such tar archive"):
        ingest(str(tmp_path / "nope.tar"), str(tmp_path / "o"), IngestConfig(**SMALL), progress=False)
    assert not (tmp_path / "o" / "images" / "imageset.json").exists()


def test_cli_and_s3_archives(ray_up, paper_archives, tmp_path, capsys):
    from pipeline.cli import main
    from tests.builders import moto_s3

    local = tmp_path / "local"
    rc = main(["ingest", *[str(paper_archives / f"sa_00000{i}.tar") for i in range(4)], "--out", str(local),
               "--select", "paper", "--shard-size", "3", "--set", "target_long=128", "--set", "target_short=96", "--set",
               "min_short=64", "--quiet"])  # fmt: skip
    assert rc == 0 and "9 inputs -> 9 accepted" in capsys.readouterr().out
    want = open_imageset(str(local))
    with moto_s3("sa1b") as (fs, _env):
        for p in paper_archives.glob("*.tar"):
            fs.put(str(p), f"sa1b/raw/{p.name}")
        cfg = IngestConfig(**SMALL, select="paper")
        s = ingest("s3://sa1b/raw/sa_*.tar", str(tmp_path / "s3set"), cfg, workers=2, progress=False)
    got = open_imageset(str(tmp_path / "s3set"))
    assert (s.accepted, s.rejected) == (9, 0)
    assert got.fingerprint == want.fingerprint  # same inputs in the same order: the same image set
    assert all(r.source.startswith("tar://") and "::s3://sa1b/raw/sa_00000" in r.source for r in got.records)
