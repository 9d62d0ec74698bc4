"""Paths as fsspec URLs (a local folder, s3://bucket/prefix, ...): the one place that turns a URL
into a filesystem, writes a file so that it appears whole or not at all, and turns a storage
endpoint that cannot be reached into one clear error naming the URL.

S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
an instance profile, ``~/.aws``...); retries are botocore's (``AWS_MAX_ATTEMPTS``,
``AWS_RETRY_MODE``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from typing import Any, Iterator

import fsspec


class StorageError(OSError):
    """A storage endpoint could not be reached (after its client's retries)."""


def url_to_fs(url: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def is_connection_error(e: BaseException) -> bool:
    """botocore/aiohttp/urllib3 failures to connect, without importing those packages here."""
    for cls in type(e).__mro__:
        name, module = cls.__name__, cls.__module__
        if module.startswith(("botocore", "aiohttp", "urllib3", "requests")) and any(
                k in name for k in ("Connect", "Connection", "Timeout", "EndpointResolution")):
            return True
    return False


def _retries() -> tuple[str, str]:
    """(attempts, retry mode) botocore uses, as the environment sets them."""
    mode = os.environ.get("AWS_RETRY_MODE", "legacy")
    default = {"legacy": 5, "standard": 3, "adaptive": 3}.get(mode, 5)
    return os.environ.get("AWS_MAX_ATTEMPTS", str(default)), mode


def unreachable_message(url: str, e: BaseException, seconds: float | None) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if url.startswith("s3://") else None
    where = f" at endpoint {endpoint}" if endpoint else ""
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    attempts, mode = _retries()
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    return (f"cannot reach {url}{where}: {detail} (gave up after {attempts} attempts{took}; "
            f"AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, now {mode}, set the retries)")


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn 'cannot connect' errors raised inside the block into one `StorageError` naming ``url``."""
    t0 = time.monotonic()
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - only connection failures are translated
        if is_connection_error(e):
            raise StorageError(unreachable_message(url, e, time.monotonic() - t0)) from None
        raise


# fsspec protocols whose PUT replaces an object whole: there one write is atomic (elsewhere a
# write goes to a temporary file renamed into place)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old file or the whole new one: a single
    PUT on object stores; elsewhere (local disks, sftp, hdfs, ...) a temporary file renamed into
    place. (Not synced to the disk: a power loss, unlike a killed process, may leave a local
    file empty.)"""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if protocols & OBJECT_STORES:
            with fs.open(path, "wb") as fh:
                fh.write(data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)


def read_bytes(url: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def exists(url: str) -> bool:
    with storage_errors(url):
        fs, path = url_to_fs(url)
        return fs.exists(path)


def json_bytes(obj: Any, default: Any = None) -> bytes:
    """``obj`` as indented JSON that every reader takes: a non-finite float (the IoU of a class
    absent from the split, a value not measured) is written as null, because NaN and Infinity
    are not JSON (JavaScript's JSON.parse, jq and Go refuse the file). ``default`` as in
    `json.dumps`. Readers that want the float back map null to NaN (`mtl.checkpoint.epoch_metrics`)."""
    return json.dumps(_finite_or_null(obj), indent=1, allow_nan=False, default=default).encode()


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj
