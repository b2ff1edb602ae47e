"""Files on a local disk or any fsspec URL (``s3://``, ``gs://``, ``memory://``): one place for paths, reads,
atomic writes, listings, renames and removals, used by every stage that stores something.

Local paths (and ``file://`` URLs) go through ``os`` directly: atomic ``os.replace`` and ``fsync`` where it matters.
Object stores have no rename: a "rename" there is copy-then-delete, and the commit point of anything written in
several objects must be a marker object written last (see the cache and the image set).

Object storage retries (docs/reliability.md) are configured here and nowhere else: :data:`RETRY_ATTEMPTS` (or
``$SPAR_STORAGE_ATTEMPTS``) attempts per request, exponential backoff with jitter, applied to every ``s3://``
filesystem of the process through :class:`pipeline.common.s3.RetryingS3FileSystem` (registered below as fsspec's
``s3`` implementation). A request whose attempts are all spent raises :class:`StorageUnavailableError`: one line
naming the URL, the attempts and the time they took.

Also here, because every format needs them identically: :func:`canonical_json` (the bytes behind every
fingerprint and checksum) and :func:`shard_stem` (``shard-000042``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.common.errors import UserError

__all__ = [
    "TMP_TAG",
    "RETRY_ATTEMPTS",
    "RETRY_ATTEMPTS_ENV",
    "retry_attempts",
    "StorageError",
    "StorageUnavailableError",
    "is_disk_full",
    "canonical_json",
    "shard_stem",
    "is_local",
    "is_url",
    "local_path",
    "absolute",
    "join",
    "filesystem",
    "exists",
    "isdir",
    "makedirs",
    "read_bytes",
    "read_json",
    "write_bytes_atomic",
    "remove",
    "rename_dir",
    "replace_file",
    "listdir",
    "size_on_disk",
    "mtime",
    "sha256_of",
    "put_dir",
    "get_dir",
    "staged_dir",
    "arrow_filesystem",
]

TMP_TAG = ".tmp-"  # infix of temporary files and folders (``<name>.tmp-<hex>``)

# The retry policy of object storage (the one place): attempts per request, first try included. Backoff between
# them is botocore's standard mode: attempt i waits rand(0, 1) * min(2**i, 20) s (i = 1, 2, ...), so 8 attempts
# ride out about half a minute of errors (71 s at most) before a request fails.
RETRY_ATTEMPTS = 8
RETRY_ATTEMPTS_ENV = "SPAR_STORAGE_ATTEMPTS"  # override (tests; a flakier store); forwarded to Ray workers


def retry_attempts() -> int:
    """Attempts per object-storage request: ``$SPAR_STORAGE_ATTEMPTS`` when set (>= 1), else RETRY_ATTEMPTS."""
    raw = os.environ.get(RETRY_ATTEMPTS_ENV, "")
    try:
        return max(1, int(raw)) if raw else RETRY_ATTEMPTS
    except ValueError:
        return RETRY_ATTEMPTS


# Every s3:// filesystem of the process is the project's (imported only when an s3 URL is first used).
for _proto in ("s3", "s3a"):
    fsspec.register_implementation(_proto, "pipeline.common.s3.RetryingS3FileSystem", clobber=True)


class StorageError(UserError):
    """A path cannot be read or written (missing, full disk, read-only, forbidden, not JSON)."""


class StorageUnavailableError(StorageError, OSError):
    """Object storage kept failing (5xx, throttling, broken connections) through every retry of a request."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is a full disk: ``ENOSPC`` / ``EDQUOT``, also when it
    only survives as text (an error re-raised from another process, as Ray Train's are)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cur) or "Disk quota exceeded" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, ASCII only, no NaN/inf (a ValueError).

    Every fingerprint and checksum of the project hashes this text's UTF-8 bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def shard_stem(i: int) -> str:
    """``shard-%06d``: the stem of shard ``i``'s files, in image sets (``.tar``/``.json``) and caches."""
    return f"shard-{i:06d}"


def is_url(path: str) -> bool:
    """True for ``scheme://...`` (``file://`` included)."""
    return "://" in path


def is_local(path: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    """A local path without its ``file://`` prefix."""
    return path[len("file://") :] if path.startswith("file://") else path


def absolute(path: str) -> str:
    """A local path made absolute; a URL as given."""
    return path if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL."""
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return "/".join([base.rstrip("/"), *parts])


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``path`` and the path inside it."""
    return fsspec.core.url_to_fs(path)


def exists(path: str) -> bool:
    """Whether ``path`` exists (remote listings are re-read, not served from fsspec's cache)."""
    if is_local(path):
        return os.path.exists(local_path(path))
    fs, p = filesystem(path)
    fs.invalidate_cache()
    return fs.exists(p)


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder (on an object store: a prefix with objects under it)."""
    if is_local(path):
        return os.path.isdir(local_path(path))
    fs, p = filesystem(path)
    fs.invalidate_cache()
    return fs.isdir(p)


def makedirs(path: str) -> None:
    """Create a folder and its parents (a no-op on object stores); a StorageError names it when impossible."""
    try:
        if is_local(path):
            os.makedirs(local_path(path), exist_ok=True)
        else:
            fs, p = filesystem(path)
            fs.makedirs(p, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the folder {path}: {e.strerror or e}") from e


def read_bytes(path: str) -> bytes | None:
    """File contents, or None when it does not exist."""
    try:
        if is_local(path):
            with open(local_path(path), "rb") as f:
                return f.read()
        fs, p = filesystem(path)
        fs.invalidate_cache()
        return fs.cat_file(p)
    except FileNotFoundError:
        return None


def read_json(path: str, what: str, error: type[Exception] = StorageError) -> dict[str, Any] | None:
    """A JSON object file, or None when missing; ``error(...)`` naming ``what`` and the path when it is not one."""
    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise error(f"{what} {path} is not a JSON object")
    return obj


def write_bytes_atomic(path: str, data: bytes, error: type[Exception] = StorageError) -> None:
    """Write a file so readers see either nothing or all of it (temp + fsync + rename locally; one PUT remotely).

    A local failure (full disk, read-only, forbidden) raises ``error`` naming the path; no temp file is left."""
    if not is_local(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)
        return
    p = local_path(path)
    tmp = f"{p}{TMP_TAG}{uuid.uuid4().hex}"
    try:
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise error(f"cannot write {p}: {e.strerror or e}") from e


def remove(path: str) -> None:
    """Remove a file or a folder tree; a missing one is fine."""
    if is_local(path):
        p = local_path(path)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        return
    fs, p = filesystem(path)
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(p):
            fs.rm(p, recursive=True)


def rename_dir(src: str, dst: str) -> bool:
    """Move folder ``src`` to ``dst`` unless ``dst`` exists (then return False).

    Local: one atomic ``rename``. Object stores: the files are copied one by one, then the source removed; the
    commit point there is a marker object, not the rename."""
    if is_local(src):
        s, d = local_path(src), local_path(dst)
        try:
            os.rename(s, d)
            return True
        except OSError:
            if os.path.exists(d):
                return False
            raise
    fs, s = filesystem(src)
    _, d = filesystem(dst)
    fs.invalidate_cache()
    if fs.exists(d):
        return False
    for f in fs.find(s):
        rel = f[len(s) :].lstrip("/")
        fs.copy(f, f"{d}/{rel}")
    fs.rm(s, recursive=True)
    fs.invalidate_cache()
    return True


def replace_file(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move file ``src`` over ``dst`` (paths inside ``fs``): atomic ``os.replace`` locally, fsspec's ``mv`` else."""
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def listdir(path: str) -> list[str]:
    """Sorted base names of the entries directly under ``path`` ([] when missing)."""
    if is_local(path):
        try:
            return sorted(os.listdir(local_path(path)))
        except FileNotFoundError:
            return []
    fs, p = filesystem(path)
    fs.invalidate_cache()
    try:
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
    except FileNotFoundError:
        return []


def size_on_disk(path: str) -> int:
    """Total bytes of the files under ``path`` (0 when missing)."""
    if is_local(path):
        total = 0
        for root, _dirs, files in os.walk(local_path(path)):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.path.getsize(os.path.join(root, f))
        return total
    fs, p = filesystem(path)
    fs.invalidate_cache()
    try:
        return int(fs.du(p, total=True))
    except FileNotFoundError:
        return 0


def mtime(path: str) -> float | None:
    """Last modification time (seconds since the epoch), or None when unknown or missing."""
    try:
        if is_local(path):
            return os.path.getmtime(local_path(path))
        fs, p = filesystem(path)
        info = fs.info(p)
        m = info.get("LastModified") or info.get("mtime") or info.get("created")
        if m is None:
            return None
        return m.timestamp() if hasattr(m, "timestamp") else float(m)
    except (FileNotFoundError, OSError):
        return None


def sha256_of(path: str, fs: fsspec.AbstractFileSystem | None = None, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes, read in chunks: a local path or URL, or a path inside ``fs``."""
    h = hashlib.sha256()
    with fs.open(path, "rb") if fs is not None else fsspec.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def put_dir(local_dir: str, url: str) -> None:
    """Copy the files under the local folder ``local_dir`` to the folder ``url`` (local path or URL), keeping the
    relative layout; existing files there are overwritten. Callers that need all-or-nothing write a marker last."""
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes_atomic(join(url, *rel.split("/")), f.read())


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local folder to write the files of the folder ``path`` into: ``path`` itself (created) when it is local;
    for a URL a temporary folder, whose files are copied to ``path`` (:func:`put_dir`) when the block ends without
    an error, and which is removed in any case."""
    if is_local(path):
        p = os.path.expanduser(local_path(path))
        makedirs(p)
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="spar-staged-") as tmp:
        yield tmp
        put_dir(tmp, path)


def get_dir(url: str, local_dir: str) -> None:
    """Copy the files under the folder ``url`` into the local folder ``local_dir`` (created); a StorageError names
    ``url`` when it holds no file."""
    if is_local(url):
        src = local_path(url)
        if not os.path.isdir(src):
            raise StorageError(f"{url} is not a folder")
        shutil.copytree(src, local_dir, dirs_exist_ok=True)
        return
    fs, p = filesystem(url)
    fs.invalidate_cache()
    files = fs.find(p)
    if not files:
        raise StorageError(f"{url} holds no file")
    for f in files:
        rel = f[len(p.rstrip("/")) :].lstrip("/")
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(f, dst)


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """``(pyarrow filesystem or None, path)`` for libraries that take a pyarrow filesystem (Ray Train's
    ``RunConfig(storage_filesystem=, storage_path=)``): None and the plain path for a local folder; else fsspec's
    filesystem of ``url`` wrapped for pyarrow, so credentials and endpoints come from the same place as every
    other remote access of the project (environment / fsspec config, never arguments)."""
    if is_local(url):
        return None, os.path.abspath(local_path(url))
    # pyarrow is heavy and only needed here: imported on use so that light commands do not load it
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, p = filesystem(url)
    return PyFileSystem(FSSpecHandler(fs)), p.rstrip("/")
