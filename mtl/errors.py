"""How the command-line tools report a bad input: one line that names the thing that is wrong."""

from __future__ import annotations

import errno
import tempfile

from mtl.storage import StorageError, credentials_message, is_connection_error, is_credentials_error, unreachable_message


class ClusterError(RuntimeError):
    """The Ray cluster cannot run the request as given: it can never hold the workers, or they
    did not start on it."""


# what the tools report as one line (exit code 2): wrong files, flags, checkpoints, run folders,
# unreachable storage, a cluster that cannot run the request. Anything else (a CUDA error, a bug)
# keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
               StorageError, ClusterError)


class WorkerFailed(RuntimeError):
    """A training worker on Ray raised ``cause`` (rank ``rank``'s error; Ray printed its
    traceback). A user error there (bad data, flags, a refused resume: `USER_ERRORS`) is reported
    as local mode reports it, one line and exit code 2; anything else keeps exit code 1."""

    def __init__(self, rank: int, cause: BaseException) -> None:
        self.rank, self.cause = rank, getattr(cause, "cause", None) or cause  # (Ray's RayTaskError wraps it)
        super().__init__(f"rank {rank}: {one_line(self.cause)}")

    @property
    def user_error(self) -> bool:
        return isinstance(self.cause, USER_ERRORS)


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line.

    An error raised in a DataLoader worker arrives re-raised by torch with the worker's whole
    traceback in its message ("Caught ValueError in DataLoader worker process 0. Original
    Traceback ..."), and a failed Ray worker's error holds its traceback too: the last line of
    that is the original message. Connection failures of a storage client (botocore, aiohttp)
    become "cannot reach <url> ...".
    """
    for err in _chain(e):
        if said := no_space(err):
            return said
        if isinstance(err, StorageError):  # (from a loader worker: inside torch's traceback text)
            return _last_line(str(err))
        if is_connection_error(err):  # raised outside `storage_errors`: the client's URL is all there is
            url = getattr(err, "kwargs", {}).get("endpoint_url") or "the storage endpoint"
            return unreachable_message(url, err, None)
        if is_credentials_error(err):
            return credentials_message("the storage", err)
    return _last_line(str(e)) or type(e).__name__


def no_space(e: BaseException) -> str:
    """What to say of a full disk or an exhausted quota (``""``: ``e`` is none). The OS seldom
    names the file; files bound for a run folder or an object store (a checkpoint, whole) may be
    written in the temporary folder first, which may be the full one."""
    if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return ""
    where = f" writing {e.filename}" if e.filename else ""
    return (f"no space left on the device{where} ({e.strerror or e}): free space on it, or write elsewhere; files bound for "
            f"the output (a checkpoint, whole) may first be written under the temporary folder {tempfile.gettempdir()} "
            f"(TMPDIR moves it)")


def _last_line(text: str) -> str:
    """A traceback's last line (the original message) without its exception type; any other text
    joined into one line."""
    text = text.strip()
    if "Traceback (most recent call last)" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        name, sep, rest = last.partition(": ")
        text = rest if sep and name.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
