"""The project's ``s3://`` filesystem: s3fs with the retry policy of :mod:`pipeline.common.storage`.

:mod:`pipeline.common.storage` registers :class:`RetryingS3FileSystem` as fsspec's ``s3``/``s3a`` implementation
(by name, so s3fs is only imported when an ``s3://`` URL is used). Every S3 filesystem of the process is then this
one: the project's own reads and writes, Zarr's ``FsspecStore``, webdataset and pyarrow through fsspec, and Ray
Train's storage filesystem (pickled to the workers, which rebuild the same class).

One retry layer: botocore's ``standard`` mode retries each request that gets a 500/502/503/504, a throttling answer
(``SlowDown``) or a broken / reset connection, ``storage.RETRY_ATTEMPTS`` attempts in all, with exponential backoff
and full jitter (a delay in ``[0, min(20 s, 2^attempt s)]``); s3fs's own loop (which would try botocore's exhausted
attempts 5 times more on ``SlowDown``) is set to one pass, so the bound is exact. When the attempts are spent, the
error is a :class:`~pipeline.common.storage.StorageUnavailableError` naming the URL, the attempts and the time.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterator
from typing import Any

import s3fs
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

from pipeline.common.storage import StorageUnavailableError, retry_attempts

__all__ = ["RetryingS3FileSystem", "is_transient"]

# s3fs's translations of 5xx answers (SlowDown / ServiceUnavailable -> EBUSY, InternalError -> EREMOTEIO)
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}


def is_transient(e: BaseException) -> bool:
    """A failure that retrying could fix: a 5xx / throttling answer or a broken connection."""
    if isinstance(e, StorageUnavailableError):
        return False  # already final
    if isinstance(e, (BotoConnectionError, HTTPClientError, TimeoutError, ConnectionError)):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose requests follow the project's retry policy (module docstring)."""

    retries = 1  # s3fs's loop: one pass; botocore's standard mode does the retrying

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = dict(kwargs.pop("config_kwargs", None) or {})
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": retry_attempts()})
        super().__init__(*args, config_kwargs=config, **kwargs)

    def _attempts(self) -> int:
        return int(self.config_kwargs.get("retries", {}).get("total_max_attempts", retry_attempts()))

    @contextlib.contextmanager
    def _final_error(self, what: str, path: str) -> Iterator[None]:
        """A transient failure that got through every attempt becomes a StorageUnavailableError naming them."""
        t0 = time.monotonic()
        try:
            yield
        except Exception as e:
            if not is_transient(e):
                raise
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StorageUnavailableError(
                f"object storage: {what} s3://{path} failed after {self._attempts()} attempts over "
                f"{time.monotonic() - t0:.1f} s ({reason})"
            ) from e

    async def _call_s3(self, method: Any, *akwarglist: Any, **kwargs: Any) -> Any:
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        where = "/".join(str(kwargs.get(k, "")) for k in ("Bucket", "Key") if kwargs.get(k)) or "(bucket)"
        with self._final_error(name, where):
            return await super()._call_s3(method, *akwarglist, **kwargs)

    async def _cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
        with self._final_error("get_object", self._strip_protocol(path)):
            return await super()._cat_file(path, *args, **kwargs)


# One instance cache with s3fs's own: ``s3fs.S3FileSystem.clear_instance_cache()`` (after a change of endpoint or
# credentials in the environment) also drops the instances of this class.
RetryingS3FileSystem._cache = s3fs.S3FileSystem._cache
