"""Paths as fsspec URLs (a local folder, s3://bucket/prefix, ...): the one place that turns a URL
into a filesystem, writes a file so that it appears whole or not at all, and turns a storage
endpoint that cannot be reached, or missing credentials, into one clear error naming the URL.
Buckets are never created: a misspelt one is an error naming it, not a new bucket.

S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
an instance profile, ``~/.aws``...); retries are botocore's (``AWS_MAX_ATTEMPTS``,
``AWS_RETRY_MODE``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import sys
import threading
import time
import uuid
from typing import Any, Iterator, NoReturn

import fsspec


# what fsspec does not take literally in a path: object stores' clients (s3fs) expand *, ? and
# [...] as a pattern when they delete or copy (another run's files would match), every
# filesystem's glob does, and "::" chains URLs (the path is cut there)
NOT_LITERAL = ("*", "?", "[", "]", "::")


def check_literal(value: str, flag: str) -> None:
    """ValueError naming ``flag`` when ``value``, a part of the paths a run writes, holds a
    character sequence fsspec would not read literally (`NOT_LITERAL`)."""
    found = [c for c in NOT_LITERAL if c in value]
    if found:
        raise ValueError(f"{flag} {value!r}: {', '.join(repr(c) for c in found)} cannot be in the path of a run's files "
                         f"(fsspec reads *, ? and [...] as a pattern, which would delete or read other runs' files, and :: "
                         f"as a chain of URLs): choose one without them")


def check_named(value: str | None, flag: str, what: str = "folder") -> None:
    """ValueError naming ``flag`` when ``value`` is given but blank: an unset variable
    (``--out "$OUT"``) would otherwise name the current folder, which an ``--overwrite`` replaces."""
    if value is not None and not value.strip():
        raise ValueError(f"{flag} {value!r} names no {what} (an unset variable?): give one")


class StorageError(OSError):
    """A storage endpoint could not be reached (after its client's retries), or its client found
    no credentials or region to call it with, or is not installed."""


def url_to_fs(url: str) -> tuple[Any, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        if _client_missing(e):
            raise _client_error(url, e) from e.__cause__
        raise


def _client_missing(e: BaseException) -> bool:
    """``e`` is fsspec's word that a protocol's client package is not installed ("Install s3fs
    to access S3"), not an import failure of the code itself."""
    from fsspec.registry import known_implementations

    return isinstance(e, ImportError) and str(e) in {v.get("err") for v in known_implementations.values()}


def _client_error(url: str, e: BaseException) -> StorageError:
    """The client's package missing (the install that has it named), or installed and failing
    to import (a version conflict: its own error said, and kept as the cause)."""
    import importlib.util

    from fsspec.registry import known_implementations

    from mtl.machine import CLUSTER_INSTALL

    scheme = url.partition("://")[0]
    package = known_implementations.get(scheme, {}).get("class", "").split(".", 1)[0]
    try:
        there = bool(package) and importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # (a module without a spec in sys.modules)
        there = False
    if there and e.__cause__ is not None:
        return StorageError(f"{url}: the storage client for {scheme}:// ({package}) is installed but cannot be imported: "
                            f"{type(e.__cause__).__name__}: {e.__cause__}")
    extra = f" ({CLUSTER_INSTALL} installs s3fs)" if scheme in ("s3", "s3a") else ""
    return StorageError(f"{url}: the storage client for {scheme}:// is not installed: {e}{extra}")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def canonical(url: str) -> str:
    """One spelling of a place: a local path normalised (``./data/`` and ``data`` are ``data``),
    a URL without a trailing slash. Not made absolute: where a relative path points is the
    caller's to decide."""
    if "://" not in url:
        return os.path.normpath(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else url


def location(url: str) -> str:
    """Where ``url`` points, spelt one way whatever the folder it is read from: a local path
    absolute (from the shell's ``$PWD`` when that is this folder: the spelling a user sees; links
    are not resolved, as the nodes of a cluster may mount the same data behind other links), a
    URL `canonical`; a shard set's manifest file names its prefix (``…/shards/manifest.json`` is
    ``…/shards``)."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        pwd = os.environ.get("PWD")
        if not os.path.isabs(path) and pwd and os.path.isabs(pwd) and _same_file(pwd, "."):
            path = os.path.join(pwd, path)
        return os.path.abspath(path).removesuffix("/manifest.json")
    return canonical(url).removesuffix("/manifest.json")


def same_place(a: str, b: str) -> bool:
    """Whether two spellings of a data path, perhaps given in other folders, name one place as
    far as can be told here: their `location`s are one (`same_location`); a relative path
    against an absolute one, when the absolute one ends with it (a relative path recorded
    where another process ran, a Ray worker's folder, cannot be resolved here); two relative
    paths, when they read alike."""
    a_rel, b_rel = ("://" not in a and not os.path.isabs(a)), ("://" not in b and not os.path.isabs(b))
    if a_rel and b_rel:
        return os.path.normpath(a) == os.path.normpath(b)
    if a_rel or b_rel:
        rel, other = (a, b) if a_rel else (b, a)
        if not is_local(other):  # (a local path and an object store's URL: never one place)
            return False
        tail = os.path.normpath(rel).removesuffix("/manifest.json")
        return location(other).endswith("/" + tail) or same_location(location(rel), location(other))
    return same_location(location(a), location(b))


def same_location(a: str, b: str) -> bool:
    """Two `location` spellings of one place: equal, or local paths of one folder (a link, a
    mount seen through another path)."""
    return a == b or ("://" not in a and "://" not in b and _same_file(a, b))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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


def store_error_code(e: BaseException) -> str | None:
    """The error code of the object store's answer behind ``e`` (s3fs raises its own exception
    from botocore's ClientError, which keeps the answer), or None: not an answer of a store (a
    local file's error, say)."""
    seen = e.__cause__ or e.__context__
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code") or "")
        seen = seen.__cause__ or seen.__context__
    return None


def denied_message(url: str, e: BaseException, code: str) -> str:
    """What an object store's refusal (`store_error_code`) asks of the user."""
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = {"InvalidObjectState": "the object is archived (a Glacier storage class): restore it first",
            "RequestTimeTooSkewed": "this machine's clock is far from the store's: set it right (NTP)"}.get(
        code, "the store refused the credentials in use: wrong or expired keys, another account's or AWS_PROFILE's, or a "
              "bucket policy that does not let them in")
    return f"cannot access {url}: {detail} ({code or 'refused'}: {hint})"


def is_credentials_error(e: BaseException) -> bool:
    """botocore's 'no credentials / no region' errors (False where botocore is not installed)."""
    try:
        from botocore import exceptions as b
    except ImportError:
        return False
    return isinstance(e, (b.NoCredentialsError, b.PartialCredentialsError, b.CredentialRetrievalError, b.NoRegionError,
                          b.SSOError, b.TokenRetrievalError))


def credentials_message(url: str, e: BaseException) -> str:
    """What to set when the client has no credentials (or no region) to call ``url`` with."""
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ == "NoRegionError":
        return f"cannot access {url}: {detail} (set AWS_DEFAULT_REGION, or region in ~/.aws/config)"
    if "SSO" in type(e).__name__ or type(e).__name__ == "TokenRetrievalError":
        return f"cannot access {url}: {detail} (an SSO login that expired or never happened: aws sso login [--profile ...])"
    return (f"cannot access {url}: {detail} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with "
            f"~/.aws/credentials, or run with an instance role)")


# A call to an object store still running after this long is said once, on stderr: an
# endpoint that accepts connections but never answers (a firewall, a proxy, a wrong port) is
# otherwise silent until the client gives up, minutes later (7 against botocore's defaults).
SLOW_NOTE_S = 30.0
_waiting: dict[int, tuple[str, float]] = {}  # calls in flight: token -> (url, start)
_tokens = itertools.count()
_watcher = {"pid": -1}
_inside = threading.local()  # a watched block of this thread is running (one inside it is not watched again)


def slow_message(url: str, seconds: float) -> str:
    s3 = url.startswith("s3://")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if s3 else None
    attempts, mode = _retries()
    retries = f", after {attempts} attempts as AWS_MAX_ATTEMPTS and AWS_RETRY_MODE {mode} say" if s3 else ""
    return (f"still waiting for {url}{f' at endpoint {endpoint}' if endpoint else ''}: a call has run for {seconds:.0f} s (a "
            f"large transfer may; an endpoint that never answers holds it until the client gives up{retries})")


def _watch() -> None:
    """This process's watcher of `_waiting`: each call slower than `SLOW_NOTE_S` is said once."""
    said: set[int] = set()
    while True:
        time.sleep(min(1.0, SLOW_NOTE_S / 6))
        now = time.monotonic()
        for token, (url, t0) in list(_waiting.items()):
            if token not in said and now - t0 >= SLOW_NOTE_S:
                said.add(token)
                print(slow_message(url, now - t0), file=sys.stderr, flush=True)
        said &= set(_waiting)


def _watched(url: str) -> int:
    """Register a call to ``url``; the first in a process (or in a forked child, which has no
    thread of its parent's and a copy of its calls) starts the watcher."""
    if _watcher["pid"] != os.getpid():
        _watcher["pid"] = os.getpid()
        _waiting.clear()
        threading.Thread(target=_watch, name="streetmtl-storage-watch", daemon=True).start()
    token = next(_tokens)
    _waiting[token] = (url, time.monotonic())
    return token


@contextlib.contextmanager
def storage_errors(url: str, watch: bool = True) -> Iterator[None]:
    """Turn 'cannot connect' and 'no credentials' errors raised inside the block into one
    `StorageError` naming ``url``: a client's own traceback names neither the URL nor what to set.
    A block of calls to a remote store still running after `SLOW_NOTE_S` is said meanwhile
    (``watch``; False for a block that does other work too: it is not one call to time)."""
    t0 = time.monotonic()
    token = _watched(url) if watch and not getattr(_inside, "watched", False) and not is_local(url) else None
    if token is not None:
        _inside.watched = True
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - only connection, credential and missing-client failures are translated
        if _client_missing(e):
            raise _client_error(url, e) from e.__cause__
        if is_connection_error(e):
            raise StorageError(unreachable_message(url, e, time.monotonic() - t0)) from None
        if is_credentials_error(e):
            raise StorageError(credentials_message(url, e)) from None
        code = store_error_code(e) if isinstance(e, PermissionError) else None
        if code is not None:  # (an object store's refusal: s3fs says only "Forbidden")
            raise StorageError(denied_message(url, e, code)) from None
        raise
    finally:
        if token is not None:
            _waiting.pop(token, None)
            _inside.watched = False


# fsspec protocols whose PUT replaces an object whole: there one write is atomic (elsewhere a
# write goes to a temporary file renamed into place)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})


def _protocols(fs: Any) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_object_store(fs: Any) -> bool:
    """Whether ``fs`` keeps whole objects under keys: a prefix needs no folder, and its
    "makedirs" would create a bucket (s3fs creates a misspelt one)."""
    return bool(_protocols(fs) & OBJECT_STORES)


def _missing_bucket(url: str, doing: str = "writing") -> str:
    scheme, _, rest = url.partition("://")
    return (f"bucket {scheme}://{rest.split('/', 1)[0]} does not exist ({doing} {url}): check its name"
            f"{', or create it (no tool here creates buckets)' if doing == 'writing' else ''}")


def missing_bucket(url: str) -> str | None:
    """For ``url`` on an object store whose bucket is not there, the error to give instead of
    "not found": a misspelt bucket in a URL to read (``--shards``, ``--root``, ``--checkpoint``)
    would otherwise read as a missing manifest, folder or file inside it. None elsewhere. One
    request; call it on the error path only."""
    if is_local(url):
        return None
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if not is_object_store(fs) or "memory" in _protocols(fs):  # (memory: keys, no buckets)
            return None
        return None if fs.exists(path.split("/", 1)[0]) else _missing_bucket(url, "reading")


def write_bytes_atomic(url: str, data: bytes, sync: bool = False) -> None:
    """Write ``data`` to ``url`` so that readers see the old file or the whole new one: a single
    PUT on object stores; elsewhere (local disks, sftp, hdfs, ...) a temporary file renamed into
    place. ``sync`` (local disks): the file and its folder are on the disk when this returns, so
    that a power loss or a kernel crash, not only a killed process, leaves the old file or the
    whole new one (`sync_local`); without it the rename may reach the disk before the bytes do,
    and a crash leaves an empty file. A missing bucket is a FileNotFoundError naming it, never
    created."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if is_object_store(fs):
            try:
                with fs.open(path, "wb") as fh:
                    fh.write(data)
            except FileNotFoundError:  # (a PUT needs no folder: only the bucket can be missing)
                raise FileNotFoundError(_missing_bucket(url)) from None
            return
        if fs.isdir(path):  # (the rename below would move the file into it)
            raise IsADirectoryError(f"{url} is a folder: a file cannot be written in its place")
        if is_local(url):
            _write_local(path, data, sync)
            return
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)


def _write_local(path: str, data: bytes, sync: bool) -> None:
    """A temporary file renamed into place (removed when the write fails); ``sync``: fsync'ed
    before the rename, and its folder and the folders above after (`_sync_entry`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if sync:
        _sync_entry(path)


def sync_local(url: str, contents: bool = True) -> None:
    """A local file or folder onto the disk (fsync), with its entry in the folders above: what is
    written after it (a checkpoint's pointer, a data set's manifest) cannot then survive a power
    loss or a kernel crash that it does not. A folder with every regular file and folder in it
    when ``contents`` (links and special files are left alone; a file gone meanwhile is
    skipped), else only its own entries. Any other store: nothing to do (an object store's PUT is
    stored once answered; sftp, hdfs, ... are not synced)."""
    root = os.path.abspath(url_to_fs(url)[1]) if is_local(url) else None
    if root is None or not os.path.exists(root):
        return
    if not os.path.isdir(root):
        _fsync(root, folder=False)
    for folder, _, files in os.walk(root) if contents and os.path.isdir(root) else ():
        for path in (os.path.join(folder, name) for name in files):
            if not os.path.islink(path) and os.path.isfile(path):
                _fsync(path, folder=False)
        _fsync(folder, folder=True)
    if os.path.isdir(root) and not contents:
        _fsync(root, folder=True)
    _sync_entry(root)


_SYNCED_ABOVE: set[tuple[str, int, int]] = set()  # folders above a synced one whose entries this process has synced


def _sync_entry(path: str) -> None:
    """The entry of ``path`` in its folder, and those folders' entries up to the root, onto the
    disk. The folder is synced every time (new names appear there); each one above once per
    process while the folder below it stays the same one, unchanged (its inode and ctime: a run
    folder's ``checkpoints/`` is new with the first checkpoint, and an unchanged folder's fsync
    still flushes the disk's cache on some file systems)."""
    folder = os.path.dirname(os.path.abspath(path))
    _fsync(folder, folder=True)
    while os.path.dirname(folder) != folder:
        child, folder = folder, os.path.dirname(folder)
        try:
            st = os.stat(child)
            key = (child, st.st_ino, st.st_ctime_ns)  # (a folder made anew may get the same inode: not its ctime)
        except OSError:
            return
        if key in _SYNCED_ABOVE:
            return
        _fsync(folder, folder=True)
        _SYNCED_ABOVE.add(key)


def _fsync(path: str, folder: bool) -> None:
    """fsync ``path``. A folder that cannot be opened for it (no read permission) or whose file
    system does not sync folders (EINVAL, EBADF) is left as it is, as PostgreSQL does
    (`fsync_fname_ext`); a file gone meanwhile too. Other errors (EIO) are raised."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except FileNotFoundError:
        return
    except (PermissionError, IsADirectoryError):
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (folder and e.errno in (errno.EBADF, errno.EINVAL)):
            raise
    finally:
        os.close(fd)


# fsspec protocols of S3, whose PUT takes conditions (If-None-Match: only if no object exists;
# If-Match: only if the object is the version of that ETag): AWS S3 since 2024, MinIO, moto
CONDITIONAL_STORES = frozenset({"s3", "s3a"})


class WriteConflict(Exception):
    """A conditional write (`write_if`) was refused: another writer changed the object first."""


def has_conditional_writes(url: str) -> bool:
    return bool(_protocols(url_to_fs(url)[0]) & CONDITIONAL_STORES)


def _s3_error_code(e: BaseException) -> str | None:
    """The S3 error code behind an s3fs error (s3fs keeps botocore's error among the causes; a
    read whose object changed under it is s3fs's FileExpired, over an OSError over botocore's
    PreconditionFailed); an HTTP 501 without a code is NotImplemented."""
    seen: BaseException | None = e
    for _ in range(5):
        seen = seen.__cause__ if seen is not None else None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code or ("NotImplemented" if status == 501 else None)
    return None


def read_tagged(url: str) -> tuple[bytes | None, str | None]:
    """An object's bytes and its ETag, of one version (s3fs reads with If-Match of the ETag it
    looked up; a version replaced in between is read again); (None, None) when it does not exist."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        for _ in range(5):
            fs.invalidate_cache(path)  # (an ETag from a cached listing would be an old version's)
            try:
                with fs.open(path, "rb", cache_type="none") as fh:
                    return fh.read(), fh.details.get("ETag")
            except FileNotFoundError:
                return None, None
            except OSError as e:
                if _s3_error_code(e) != "PreconditionFailed" and type(e).__name__ != "FileExpired":
                    raise
        raise StorageError(f"{url} kept changing while it was read (5 tries): another writer rewrites it constantly")


def write_if(url: str, data: bytes, etag: str | None) -> str | None:
    """A compare-and-swap on an object store with conditional writes (`has_conditional_writes`):
    write ``url`` only if it is still the version with ``etag`` (None: only if it does not
    exist). Returns the new version's ETag. Raises `WriteConflict` when another write came
    first, NotImplementedError when the endpoint does not take the conditions."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        try:
            out = fs.pipe_file(path, data, mode="create") if etag is None else fs.pipe_file(path, data, IfMatch=etag)
        except FileExistsError:
            raise WriteConflict(f"{url} exists: another writer created it first") from None
        except FileNotFoundError:
            if etag is None:
                raise FileNotFoundError(_missing_bucket(url)) from None
            raise WriteConflict(f"{url} is gone: another writer deleted it") from None
        except OSError as e:
            _conditional_failure(url, e, "writes")
    return out.get("ETag") if isinstance(out, dict) else None


def _conditional_failure(url: str, e: OSError, what: str) -> NoReturn:
    """Raise an s3fs error of a conditional request as `WriteConflict` (the object is not the
    version named) or NotImplementedError (the endpoint takes no conditions); others as they are."""
    code = _s3_error_code(e)
    if code in ("PreconditionFailed", "ConditionalRequestConflict"):
        raise WriteConflict(f"{url} changed: another writer replaced it first") from None
    if code == "NotImplemented":
        raise NotImplementedError(f"{url}: the endpoint does not take conditional {what} ({code})") from e
    raise e


def delete_if(url: str, etag: str) -> None:
    """Delete ``url`` only if it is still the version with ``etag`` (S3's conditional delete);
    `WriteConflict` when another writer replaced it, NotImplementedError when the endpoint does
    not take the condition."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
        except FileNotFoundError:
            return  # (gone already)
        except OSError as e:
            _conditional_failure(url, e, "deletes")
        finally:
            fs.invalidate_cache(path)


def read_bytes(url: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def folder_names(url: str) -> list[str]:
    """The names of what folder ``url`` holds ([] when it is no folder). Listed afresh: s3fs keeps
    a listing for the process's life, so entries made since would be missing."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        fs.invalidate_cache(path)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] if fs.isdir(path) else []


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
