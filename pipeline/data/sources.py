"""Step 1 of an image's path: where it comes from. ``SRC`` (a folder, one image, a list file or a glob; local or any
fsspec URL) is expanded into sorted ``(source, relative name)`` pairs, each gets a sanitised unique *key* (its name
in the image set), and :func:`read_source` fetches one source's bytes inside a shard task.

An input that cannot become a training image raises :class:`Rejected`; its reason goes to ``rejected.parquet``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable

import fsspec

from pipeline.common.storage import is_url
from pipeline.data.config import IngestError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Rejected",
    "error_text",
    "list_sources",
    "sanitize_key",
    "assign_keys",
    "read_source",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_KEY_LEN = 96
_GLOB_CHARS = re.compile(r"[*?\[]")


class Rejected(Exception):
    """An input that cannot become a training image; ``reason`` is stored in rejected.parquet."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_text(e: BaseException) -> str:
    """Exception text without memory addresses (rejected.parquet must be reproducible)."""
    return f"{type(e).__name__}: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))


def list_sources(src: str) -> list[tuple[str, str]]:
    """Expand SRC into sorted (source, relative name) pairs.

    SRC is a folder (recursive; image extensions only), a single image, a text file of paths (one a line,
    ``#`` comments; relative paths are relative to the list's folder), or a glob; local or any fsspec URL.
    """
    fs, path = fsspec.core.url_to_fs(src)
    unstrip: Callable[[str], str] = fs.unstrip_protocol if is_url(src) else (lambda p: p)
    if _GLOB_CHARS.search(path):
        base = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not found:
            raise IngestError(f"{src}: glob matches no files")
        return [(unstrip(p), _rel(p, base)) for p in found]
    if not fs.exists(path):
        raise IngestError(f"{src}: no such file or folder")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise IngestError(f"{src}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return [(unstrip(p), _rel(p, path)) for p in found]
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return [(unstrip(path), path.rsplit("/", 1)[-1])]
    return _list_file(fs, path, src, unstrip)


def _list_file(
    fs: fsspec.AbstractFileSystem, path: str, src: str, unstrip: Callable[[str], str]
) -> list[tuple[str, str]]:
    """The (source, relative name) pairs a list file names (URL lines are taken as they are)."""
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{src}: not a readable UTF-8 list of image paths ({e})") from e
    base = path.rsplit("/", 1)[0] if "/" in path else ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_url(line):
            out[line] = fsspec.core.url_to_fs(line)[1]
            continue
        p = line if line.startswith("/") or not base else f"{base}/{line}"
        p = os.path.normpath(p) if not is_url(src) else p
        out[unstrip(p)] = _rel(p, base) if base else p
    if not out:
        raise IngestError(f"{src}: list file names no paths")
    return sorted(out.items())


def _rel(p: str, base: str) -> str:
    base = base.rstrip("/")
    if base and p.startswith(base + "/"):
        return p[len(base) + 1 :]
    return p.lstrip("/")


def sanitize_key(rel: str) -> str:
    """Key from a relative source name: drop the extension, map anything outside ``[A-Za-z0-9_-]`` (separators,
    dots, ``..``) to ``_``, collapse runs, trim; long names are shortened with a hash. Never empty, never a path."""
    base = rel.replace("\\", "/")
    head, _, last = base.rpartition("/")
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    raw = f"{head}/{stem}" if head else stem
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", raw)
    key = re.sub(r"_+", "_", key).strip("_-") or "image"
    if len(key) > MAX_KEY_LEN:
        key = f"{key[: MAX_KEY_LEN - 17]}_{hashlib.sha256(rel.encode()).hexdigest()[:16]}"
    return key


def assign_keys(rels: Iterable[str]) -> list[str]:
    """Sanitised keys, unique in input order (later duplicates get ``-2``, ``-3``, …)."""
    used: set[str] = set()
    keys = []
    for rel in rels:
        base = sanitize_key(rel)
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        keys.append(key)
    return keys


def read_source(source: str) -> bytes:
    """The bytes of one source (local path or URL); Rejected when it is missing or unreadable."""
    try:
        with fsspec.open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing: no such file") from None
    except IsADirectoryError:
        raise Rejected("not_an_image: is a directory") from None
    except OSError as e:
        raise Rejected(f"unreadable: {error_text(e)}") from None
