"""Outputs that appear whole or not at all."""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from typing import Collection, Iterator, Sequence

from mtl.machine import knows_its_processes, machine_token, process_gone
from mtl.storage import check_named, exists, folder_names, is_local, is_object_store, storage_errors, url_to_fs


def output_dir(out: str, overwrite: bool = False, inputs: Sequence[str] = (), replaceable: Collection[str] = ()) -> str:
    """``out`` as an absolute local path (links resolved), once it is known to be one that
    `atomic_dir` may fill: a local folder (ValueError for a URL), not a file, empty unless
    ``overwrite`` (FileExistsError), and neither one of the ``inputs`` (files or folders the
    command reads) nor a folder above or in one (ValueError, `check_not_above`): replacing it would delete
    what is being read. Commands check it before their long work, not after; what a killed
    writer left beside it is cleaned up first (`clean_up_after_dead_writers`, said on stderr),
    so that the check sees what the next write will."""
    check_named(out, "the output folder")
    if "://" in out and not out.startswith("file://"):
        raise ValueError(f"{out}: this output is written to a local folder (write it here, then copy it, e.g. with "
                         f"aws s3 cp --recursive)")
    # (a link is followed: its target is what gets replaced, beside it on its own disk; replacing
    # the link would leave the target holding the old output and a folder on the link's disk)
    out = os.path.realpath(out.removeprefix("file://"))
    for line in clean_up_after_dead_writers(out):
        print(line, file=sys.stderr)
    check_not_above(out, inputs, replaceable)
    check_not_here(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} is a file, not a folder")
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    return out


def check_not_here(out: str) -> None:
    """ValueError when the local folder ``out`` (links resolved) is the folder this command runs
    in or one above it (``--out .``, or a blank one: an unset variable): an output replaces its
    folder whole, and that would delete the working folder (a checkout, a home folder)."""
    if not is_local(out):
        return
    here, out = os.path.realpath(os.getcwd()), os.path.realpath(out.removeprefix("file://"))
    if here == out or here.startswith(out.rstrip("/") + "/"):
        raise ValueError(f"{out} holds the folder this command runs in ({here}): writing the output there would replace it; "
                         f"choose another folder")


def check_not_above(out: str, inputs: Sequence[str], replaceable: Collection[str] = ()) -> None:
    """ValueError when the folder ``out`` is one of the ``inputs``, a folder above one, or a
    folder inside one that holds anything but ``replaceable`` entries (what an earlier output
    of this kind holds): replacing it would delete what is read (the split folder of the data
    read, Cityscapes' gtFine/, a run's checkpoints/). A new folder inside an input, or an earlier
    output there, deletes nothing read. Local paths are compared with links resolved, URLs of one
    store by their paths; an input on another store is never below ``out``."""
    where, at = _location(out)
    for src in inputs:
        src_where, path = _location(src)
        if src_where != where:
            continue
        if path == at or path.startswith(at.rstrip("/") + "/"):
            raise ValueError(f"{out} holds the input {src}: writing the output there would replace it; choose another folder")
        if at.startswith(path.rstrip("/") + "/") and not set(_entries(out)) <= set(replaceable):
            raise ValueError(f"{out} is part of the input {src}: writing the output there would replace it; choose a folder "
                             f"that is not there yet, or one outside it")


def _entries(url: str) -> list[str]:
    """The names in folder ``url`` ([] when there is none; a file: itself)."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if fs.exists(path) and not fs.isdir(path):
            return [path]
    return folder_names(url)


def check_output_file(url: str, flag: str, overwrite: bool = False, inputs: Sequence[str] = ()) -> None:
    """Before the long work: ``url`` (a file ``flag`` names, written whole by `write_bytes_atomic`)
    is not a folder, not under a file, not one of the ``inputs`` or a file inside one (ValueError:
    it would replace what is read, whatever ``overwrite`` says), and not an existing file unless
    ``overwrite`` (FileExistsError)."""
    where, at = _location(url)
    for src in inputs:
        src_where, path = _location(src)
        if src_where == where and (at == path or (at.startswith(path.rstrip("/") + "/") and exists(url))):
            raise ValueError(f"{flag} {url} is {'the input' if at == path else 'part of the input'} {src}: writing it "
                             f"would replace what is read; choose another file")
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if fs.isdir(path):
            raise IsADirectoryError(f"{flag} {url} is a folder: give the path of a file to write")
        if fs.exists(path) and not overwrite:
            raise FileExistsError(f"{flag} {url} exists (pass --overwrite to replace it)")
        parent = path.rsplit("/", 1)[0]
        while not is_object_store(fs) and parent and not fs.exists(parent):
            parent = parent.rsplit("/", 1)[0]  # (the nearest folder there is: the write makes the rest)
        if not is_object_store(fs) and parent and not fs.isdir(parent):
            raise NotADirectoryError(f"{flag} {url}: {parent} is a file, not a folder")


def _location(url: str) -> tuple[str, str]:
    """(store, path): ("file", the real path) for a local one, else the URL's protocol and path."""
    if is_local(url):
        return "file", os.path.realpath(url.removeprefix("file://"))
    fs, path = url_to_fs(url)
    return (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]), path.rstrip("/")


# a writer's sibling folders of its output: <out>.tmp-<pid>-<machine>-<random> (being filled),
# <out>.old-<pid>-<machine>-<random> (the output before, moved aside for the new one)
_ASIDE = re.compile(r"\.(tmp|old)-(\d+)-([0-9a-f]{8})-[0-9a-f]{8}")


def _aside(out: str, kind: str) -> str:
    return f"{out}.{kind}-{os.getpid()}-{machine_token()}-{uuid.uuid4().hex[:8]}"


def clean_up_after_dead_writers(out: str) -> list[str]:
    """The sibling folders of ``out`` that a writer of this machine left when it was killed
    (SIGKILL, the OOM killer: its ``finally`` never ran): a folder it was filling is deleted;
    the output it had moved aside for a new one goes back in place when the kill came between
    its two renames (``out`` missing, its filled folder still there), else is deleted (a kill
    while it deleted it leaves part of it: never put back). A live writer's folders, and
    another machine's (a shared file system, this one before a reboot, a restarted container),
    are left alone, as is everything where this machine cannot be told from another (no /proc).
    Returns what it did, a line each, for the caller to show."""
    parent, name = os.path.split(out)
    if not os.path.isdir(parent) or not knows_its_processes():
        return []
    dead: dict[str, list[tuple[str, str]]] = {}  # pid -> (kind, entry) of the writers of this machine that are gone
    for entry in sorted(os.listdir(parent)):
        m = _ASIDE.fullmatch(entry[len(name):]) if entry.startswith(name) else None
        if m is not None and m[3] == machine_token() and process_gone(m[2]):
            dead.setdefault(m[2], []).append((m[1], entry))
    done = []
    for pid, entries in dead.items():
        filled = any(kind == "tmp" for kind, _ in entries)
        for kind, entry in sorted(entries, key=lambda e: e[0] != "old"):  # (an output put back first, then the rest)
            path = os.path.join(parent, entry)
            if kind == "old" and filled and not os.path.exists(out) and _put_back(path, out):
                done.append(f"{out}: put back the output that a killed writer (process {pid}) had moved aside")
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                done.append(f"{path}: deleted, left by a killed writer (process {pid})")
    return done


def _put_back(path: str, out: str) -> bool:
    try:
        os.rename(path, out)
        return True
    except OSError:  # (another writer cleaning up at the same time put its copy back first)
        return False


@contextmanager
def atomic_dir(out: str, overwrite: bool = False, inputs: Sequence[str] = (), replaceable: Collection[str] = ()) -> Iterator[str]:
    """Yield a temporary sibling folder of ``out`` to fill; it replaces ``out`` only when the
    block finishes without error, so an interrupted writer never leaves a folder that looks
    complete. ``out`` must pass `output_dir`; one that another writer finished while this one
    ran is refused too (FileExistsError: theirs is kept, this one's is dropped). What a killed
    writer left beside ``out`` is cleaned up first (`clean_up_after_dead_writers`, said on
    stderr, by `output_dir`), so its output before is back when the kill came between the two renames."""
    out = output_dir(out, overwrite, inputs, replaceable)
    tmp = _aside(out, "tmp")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.exists(out):
            if not overwrite and os.listdir(out):
                raise FileExistsError(f"{out} was written by another process while this one ran; it is left as it is")
            old = _aside(out, "old")  # moved aside, not deleted: a kill now leaves one of the two whole
            os.rename(out, old)
        try:
            os.rename(tmp, out)  # (onto a folder another writer made in the meantime: OSError, ENOTEMPTY)
        except OSError as e:
            if old and os.path.exists(out):  # another writer's finished output took the place: the old one goes
                shutil.rmtree(old, ignore_errors=True)
            elif old:
                os.rename(old, out)  # the old output back in its place
            if not old and os.path.isdir(out) and os.listdir(out):
                raise FileExistsError(f"{out} was written by another process while this one ran; it is left as it is") from e
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
