"""Images straight from tar archives (SA-1B's released ``sa_NNNNNN.tar``), local or any fsspec URL, never extracted.

The driver lists each archive's members by reading only their tar headers (:func:`list_archive_members`; a seek
past every member's data, one small ranged read per member on S3), keeps the image members (``.json`` and other
non-images are skipped) and, with ``select="paper"``, exactly the authors' selection (:func:`paper_selection`).
Every member becomes a source ``tar://<member>::<archive>`` (fsspec's own chained-URL form, so
``fsspec.open(source)`` opens it too) with its byte range in a :class:`MemberLocation`; a shard task reads its
members in archive order through one open handle per archive (:class:`ArchiveReader`).

Damage is listed, never fatal: a member whose data runs past the end of a truncated archive, and the unreadable
tail of an archive that ends inside a header, are inputs rejected with ``truncated``/``truncated_archive``;
an undecodable member is rejected by the decoder as any other file (``corrupt``/``not_an_image``).
"""

from __future__ import annotations

import contextlib
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO

import fsspec

from pipeline.common.storage import is_url
from pipeline.data.config import IngestError
from pipeline.data.sources import IMAGE_EXTENSIONS, Rejected, error_text, read_source

__all__ = [
    "MemberLocation",
    "ArchiveReader",
    "is_archive",
    "list_archive_members",
    "paper_selection",
    "archive_sources",
]

ARCHIVE_EXTENSIONS = (".tar",)
# the authors' sa1b_download.sh at 0f63ff2: INDICES=(0 1 2), MAX_INDEX=25000 (rm sa_*.jpg whose number > 25000)
PAPER_ARCHIVES = ("sa_000000.tar", "sa_000001.tar", "sa_000002.tar")
PAPER_MAX_INDEX = 25_000
# the authors' ImageOnlyDataset reads these (lower-cased name) and nothing else
PAPER_EXTENSIONS = (".jpg", ".png")
SELECTIONS = ("paper",)
_SA_JPG = re.compile(r"sa_(.*)\.jpg")  # find -name 'sa_*.jpg' (case-sensitive)
_LIST_BLOCK = 1 << 16  # listing reads headers only: small blocks, one ranged read per member on object stores


@dataclass(frozen=True)
class MemberLocation:
    """Where a member's bytes are in its archive: ``size`` bytes from ``offset``; ``available`` of them exist
    (fewer when the archive is truncated). ``tail=True``: not a member but the unreadable end of a truncated archive,
    from ``offset`` on."""

    archive: str
    offset: int
    size: int
    available: int
    tail: bool = False


def is_archive(src: str) -> bool:
    """Whether ``src`` names tar archives (a ``.tar`` path or URL, or a glob ending in ``.tar``)."""
    return src.lower().endswith(ARCHIVE_EXTENSIONS)


def expand_archives(src: str) -> list[str]:
    """The archives ``src`` names (a glob is expanded, sorted); IngestError when there are none."""
    fs, path = fsspec.core.url_to_fs(src)
    unstrip = fs.unstrip_protocol if is_url(src) else (lambda p: p)
    if re.search(r"[*?\[]", path):
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not found:
            raise IngestError(f"{src}: glob matches no tar archives")
        return [unstrip(p) for p in found]
    if not fs.isfile(path):
        raise IngestError(f"{src}: no such tar archive")
    return [src]


def list_archive_members(archive: str) -> list[tuple[str, MemberLocation]]:
    """(member name, location) of every regular file in ``archive``, in archive order, from the headers alone.

    A member cut short by the archive's end is listed with ``available < size``; an archive that ends inside a header
    (or holds garbage where a header should be) gets a last entry with ``tail=True``. IngestError when ``archive``
    is not a tar archive at all."""
    fs, path = fsspec.core.url_to_fs(archive)
    try:
        total = int(fs.size(path))
        f = fs.open(path, "rb", block_size=_LIST_BLOCK) if is_url(archive) else fs.open(path, "rb")
    except OSError as e:
        raise IngestError(f"{archive}: cannot open the archive ({error_text(e)})") from e
    with f:
        return _scan(f, archive, total)


def _scan(f: IO[bytes], archive: str, total: int) -> list[tuple[str, MemberLocation]]:
    """Walk the headers of the open archive ``f`` of ``total`` bytes (see :func:`list_archive_members`)."""
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise IngestError(f"{archive}: not a tar archive ({e})") from e
    out: list[tuple[str, MemberLocation]] = []
    while True:
        try:
            ti = tf.next()
        except tarfile.TarError:  # "unexpected end of data": the previous member's data is cut short
            break
        if ti is None:
            break
        if ti.isfile():
            avail = max(0, min(ti.size, total - ti.offset_data))
            out.append((ti.name, MemberLocation(archive, ti.offset_data, ti.size, avail)))
    end = tf.offset  # where the next header would start
    if not _clean_end(f, end, total) and not (out and out[-1][1].available < out[-1][1].size):
        out.append((f"@{end}", MemberLocation(archive, end, total - end, max(0, total - end), tail=True)))
    return out


def _clean_end(f: IO[bytes], end: int, total: int) -> bool:
    """Whether the archive ends properly at ``end``: with a zero block, tar's end-of-archive marker (an archive cut
    exactly between two members has none)."""
    if end >= total:
        return False
    f.seek(end)
    block = f.read(512)
    return len(block) == 512 and not any(block)


def paper_selection(names: Iterable[str]) -> list[str]:
    """The member names the authors' ``sa1b_download.sh`` + ``ImageOnlyDataset`` keep (order kept).

    ``tar --exclude='*.json'``; then ``find -name 'sa_*.jpg'`` files whose number (the name between ``sa_`` and the
    first ``.``, base 10) is > 25,000 are removed; the dataset reads names ending in ``.jpg``/``.png``."""
    kept = []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.endswith(".json") or not base.lower().endswith(PAPER_EXTENSIONS):
            continue
        m = _SA_JPG.fullmatch(base)
        if m:
            digits = m.group(1).split(".", 1)[0]
            if not digits.isdigit():
                raise IngestError(f"{name}: the authors' script cannot read an index from this name")
            if int(digits) > PAPER_MAX_INDEX:
                continue
        kept.append(name)
    return kept


def _paper_archives(archives: Sequence[str]) -> list[str]:
    """The given archives that the paper uses, in the authors' order; IngestError naming any that are missing."""
    by_name = {a.rstrip("/").rsplit("/", 1)[-1]: a for a in archives}
    missing = [n for n in PAPER_ARCHIVES if n not in by_name]
    if missing:
        raise IngestError(
            f"--select paper needs the archives {', '.join(PAPER_ARCHIVES)}; missing: {', '.join(missing)}"
        )
    return [by_name[n] for n in PAPER_ARCHIVES]


def archive_sources(
    srcs: Sequence[str], select: str = ""
) -> tuple[list[tuple[str, str]], dict[str, MemberLocation]]:
    """The image members of the archives ``srcs`` names: ((source, member name) pairs in archive then member
    order, {source: location}). ``select="paper"``: the authors' archives and images only (others are skipped).

    Damaged parts (see the module docstring) are listed too, as sources the shard task rejects."""
    if select and select not in SELECTIONS:
        raise IngestError(f"unknown selection {select!r} (known: {', '.join(SELECTIONS)})")
    archives = [a for s in srcs for a in expand_archives(s)]
    if select == "paper":
        archives = _paper_archives(archives)
    pairs: list[tuple[str, str]] = []
    where: dict[str, MemberLocation] = {}
    for archive in archives:
        members = list_archive_members(archive)
        images = [n for n, loc in members if not loc.tail and n.lower().endswith(IMAGE_EXTENSIONS)]
        keep = set(paper_selection(images) if select == "paper" else images)
        for name, loc in members:
            if name in keep or loc.tail:
                # a member's source is fsspec's chained URL (``fsspec.open`` reads it)
                src = f"{archive}@{loc.offset}" if loc.tail else f"tar://{name}::{archive}"
                pairs.append((src, name.removeprefix("./")))
                where[src] = loc
    if not pairs:
        raise IngestError(f"{', '.join(srcs)}: the archive(s) hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return pairs, where


class ArchiveReader:
    """Reads a shard's sources: archive members by byte range through one open handle per archive (members come in
    archive order, so object-store reads stream forward), anything else with :func:`read_source`."""

    def __init__(self, locations: dict[str, MemberLocation] | None = None) -> None:
        self.locations = locations or {}
        self._open: dict[str, IO[bytes]] = {}
        self._files = contextlib.ExitStack()  # closes the handles on exit

    def read(self, source: str) -> bytes:
        """The bytes of ``source``; Rejected for a truncated member or archive tail, or an unreadable archive."""
        loc = self.locations.get(source)
        if loc is None:
            return read_source(source)
        if loc.tail:
            raise Rejected(
                f"truncated_archive: {loc.archive} has no complete tar header or end marker at byte "
                f"{loc.offset} (of {loc.offset + loc.size}); any members after it are missing"
            )
        if loc.available < loc.size:
            raise Rejected(
                f"truncated: the archive ends after {loc.available} of the member's {loc.size} bytes"
            )
        try:
            f = self._handle(loc.archive)
            f.seek(loc.offset)
            data = f.read(loc.size)
        except OSError as e:
            raise Rejected(f"unreadable: {error_text(e)}") from None
        if len(data) != loc.size:
            raise Rejected(f"truncated: read {len(data)} of the member's {loc.size} bytes")
        return data

    def _handle(self, archive: str) -> IO[bytes]:
        if archive not in self._open:
            self._open[archive] = self._files.enter_context(fsspec.open(archive, "rb"))
        return self._open[archive]

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()
