"""Miniscapes folder -> WebDataset tar shards (+ manifest.json) on any fsspec URL.

    python -m data_prep.shard --root data/miniscapes --shards s3://bucket/miniscapes-shards
    python -m data_prep.shard --root s3://bucket/miniscapes --shards /mnt/shards --shard-size 1000   # samples/shard

Each split becomes ``<split>-000000.tar`` ...: by default (``--shard-size auto``) about 256 shards
of equal sample counts, each of at least 32 samples (fewer shards for a split under 8192 samples)
and at most 256 MB. Training deals whole shards to its ranks and their loader workers, so a split
needs many; each is opened once per epoch, so none should be tiny. ``--shard-size 1000`` puts
1000 samples in each shard, ``256MB`` fills each up to 256 MB. A sample is keyed by its index and holds
``rgb.jpg``, ``semseg.png`` and ``depth.png`` as the original bytes; a split without labels (a
real test split: ``rgb/`` only) holds ``rgb.jpg`` only, and the manifest lists each split's
``modalities``. Every sample is validated (all files present, sizes agree, labels in
0..18/255) while it is written; problems name the files as ``<split>/<modality>/<index>.<ext>``
under the source. ``manifest.json`` is written
last: readers trust only shards listed there, so an interrupted run never looks complete.
Re-running resumes: a shard finished by an earlier run (the same samples, with the same file
sizes and versions: ETag on S3, modification time on disk) is kept, not rewritten. A
destination that holds a complete shard set is refused unless ``--overwrite``; then the new
shards are written under staging names in ``_progress/`` while the old set stays readable (a run
that fails on a bad sample, an I/O error or a kill leaves it as it was, and a re-run resumes
the staged shards); only once every shard is written does the old manifest go, the new shards
move into place and the new manifest follow. Splits not in ``--splits`` keep their shards and
their manifest entries (saved beside the shards before the old manifest goes: a run killed while
moving keeps them too, and the next run publishes them with its own splits). A run whose
``--splits`` leaves out a split an interrupted run began is refused, naming it: its shards
would be left unlisted.
Only this tool's shards (``<split>-NNNNNN.tar`` that one of its manifests or progress records
lists) are ever deleted or overwritten: a shard-named file that none lists (another pipeline's)
is refused unless ``--overwrite``, and other files at the destination stay. A Miniscapes folder
(``<split>/rgb/`` or ``conversion.json``) is refused as the destination. The destination's bucket
must exist (it is never created).
S3 endpoint and credentials come from the usual AWS environment (``AWS_ENDPOINT_URL``...) or
``--endpoint-url``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import tyro

from data_prep.pool import run_pooled
from mtl import __version__
from mtl.cli import parse
from mtl.data.folder import folder_marks, scan_split, split_modalities, stems_by_index
from mtl.data.miniscapes import MODALITIES, SHARD_PROGRESS, SPLITS, Split, check_splits, decode_sample
from mtl.data.shards import FORMAT
from mtl.errors import no_space
from mtl.machine import check_workers, usable_cpus, worker_pool
from mtl.storage import check_literal, check_named, is_local, read_bytes, storage_errors, sync_local, url_to_fs, write_bytes_atomic

MEMBERS = {mod: f"{mod}.{ext}" for mod, ext in MODALITIES.items()}  # tar member suffix per modality

# --shard-size auto, the default. Training deals whole shards to its ranks, and each rank's to its
# loader workers (12 per rank by default); it refuses more ranks than shards and leaves workers
# without a shard idle. So a split gets about AUTO_SHARDS shards (16 ranks x 12 workers with some
# to spare; ranks end up within one shard of each other), each of at least AUTO_MIN_SAMPLES
# samples (opening a shard, one request on S3, then costs little against decoding it) and at
# most AUTO_MAX_BYTES (a shard is cut early rather than grow past it).
AUTO_SHARDS = 256
AUTO_MIN_SAMPLES = 32
AUTO_MAX_BYTES = 256 << 20
SHARD_SIZE_HELP = (f"samples per shard (1000), bytes per shard (256MB), or auto: about {AUTO_SHARDS} shards per split "
                   f"of at least {AUTO_MIN_SAMPLES} samples and at most {AUTO_MAX_BYTES >> 20}MB each: enough for "
                   f"16 ranks x 12 loader workers (training deals whole shards to them)")
# in SHARD_PROGRESS: the manifest entries of the splits an --overwrite run leaves alone, written
# before it removes the old manifest (`_publish`), so that a run killed while it moves its shards
# into place loses none of them (`_kept_entries`)
KEPT = "kept.json"
# in SHARD_PROGRESS: the shards earlier manifests listed for the splits being sharded, which the
# run deletes once its own manifest is out when that no longer lists them (`_clean_up`)
REPLACED = "replaced.json"
# in SHARD_PROGRESS: ``<shard>.pending``, written before a shard is: a shard a killed worker left
# half-written is this tool's, to delete (`_written_before`) when the next plan does not list it
PENDING = ".pending"


def shard_name(split: str, i: int) -> str:
    """The file name of a split's ``i``-th shard: the only names this tool writes, and deletes."""
    return f"{split}-{i:06d}.tar"


def is_shard_name(name: str) -> bool:
    split, _, rest = name.partition("-")
    number = rest.removesuffix(".tar")
    return split in SPLITS and number.isdigit() and name == shard_name(split, int(number))


@dataclass
class ShardJob:
    split: str
    name: str
    src: str
    dst: str
    stems: list[str]
    plan_hash: str  # this shard's source: its samples, their file sizes and versions, the flags (`_plan_jobs`)
    skip_bad: bool
    modalities: tuple[str, ...] = tuple(MODALITIES)  # ("rgb",) for a split without labels
    stage: bool = False  # written under its staging name (a published set is being replaced)


@dataclass
class ShardResult:
    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    plan_hash: str
    image_sizes: list[list[int]] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    reused: bool = False
    staged: bool = False  # the shard is under its staging name (`_publish` moves it into place)


class _HashingWriter(io.RawIOBase):
    """Counts and hashes the bytes of the tar stream on their way to the (remote) file."""

    def __init__(self, fh) -> None:
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        self.fh.write(b)
        return len(b)


def parse_shard_size(text: str) -> tuple[str, int]:
    """'256MB' -> ('bytes', 268435456); '1000' -> ('samples', 1000); 'auto' -> ('auto', 0)."""
    t = text.strip().upper()
    if t == "AUTO":
        return "auto", 0
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    for u, mult in units.items():
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            n = int(float(t[: -len(u)]) * mult)
            if n <= 0:
                break
            return "bytes", n
    if t.isdigit() and int(t) > 0:
        return "samples", int(t)
    raise ValueError(f"--shard-size must be auto, a sample count (e.g. 1000) or a size (e.g. 256MB), got {text!r}")


def plan_shards(samples: list[tuple[str, dict[str, int]]], kind: str, limit: int) -> list[list[str]]:
    """Cut the index-ordered samples into shards of at most ``limit`` samples ("samples") or
    bytes ("bytes", from the file sizes), or ("auto") about `AUTO_SHARDS` of equal sample counts
    (within one), each of at least `AUTO_MIN_SAMPLES` (one shard for a smaller split), cut early
    at `AUTO_MAX_BYTES`. A function of the samples and their sizes alone: a re-run plans the
    same shards, so an interrupted run's finished ones are found again."""
    counts = _auto_counts(len(samples)) if kind == "auto" else [limit if kind == "samples" else math.inf]
    max_bytes = {"samples": math.inf, "bytes": limit, "auto": AUTO_MAX_BYTES}[kind]
    shards, cur, cur_bytes = [], [], 0
    for stem, sizes in samples:
        size = sum(sizes.values()) + 3 * 1024  # tar headers and padding
        max_samples = counts[min(len(shards), len(counts) - 1)]  # (past the plan: a shard cut early at max_bytes)
        if cur and (len(cur) >= max_samples or cur_bytes + size > max_bytes):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(stem)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards


def _auto_counts(n: int) -> list[int]:
    """--shard-size auto's samples per shard for a split of ``n``: the most shards, up to about
    `AUTO_SHARDS`, of at least `AUTO_MIN_SAMPLES` each, their counts within one of each other
    (2975: 31 of 33 and 61 of 32; 40: one of 40)."""
    k = max(1, n // max(AUTO_MIN_SAMPLES, -(-n // AUTO_SHARDS)))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "streetmtl", "streetmtl"
    return info  # fixed metadata: the same input gives byte-identical shards


def write_shard(job: ShardJob) -> ShardResult:
    """Write one shard (validating each sample) and a small progress record beside it. A shard
    of a run that replaces a published set goes under its staging name (``job.stage``): the old
    set stays readable until every new shard is written (`_publish`)."""
    with storage_errors(job.dst, watch=False):  # (reading and checking samples too: not one call to time)
        dst_fs, dst_base = url_to_fs(job.dst)
        progress = f"{dst_base.rstrip('/')}/{SHARD_PROGRESS}"
        record = f"{progress}/{job.name}.json"
        prev = _earlier_result(dst_fs, f"{dst_base.rstrip('/')}/{job.name}", _staged(dst_base, job.name), record, job.plan_hash)
        if prev is not None:
            return prev
        if dst_fs.exists(record):  # (a record describes the last shard written whole, where it says)
            dst_fs.rm(record)
        path, url = ((_staged(dst_base, job.name), _staged(job.dst, job.name)) if job.stage else
                     (f"{dst_base.rstrip('/')}/{job.name}", f"{job.dst.rstrip('/')}/{job.name}"))
        # (a record before the shard: a worker killed while writing it leaves a file this tool knows as its own)
        write_bytes_atomic(f"{job.dst.rstrip('/')}/{SHARD_PROGRESS}/{job.name}{PENDING}", b"")
        result = _write_tar(job, dst_fs, path)
        if result.bad and not job.skip_bad:
            dst_fs.rm(path)  # this run will fail: leave no shard with missing samples behind
            return result
        # (on a local disk the shard is synced first: a record survives a power loss only with its shard)
        sync_local(url)
        write_bytes_atomic(f"{job.dst.rstrip('/')}/{SHARD_PROGRESS}/{job.name}.json", json.dumps(asdict(result)).encode())
    return result


def _staged(base: str, name: str) -> str:
    """Shard ``name``'s staging path under the destination ``base`` (a path or URL): in
    SHARD_PROGRESS, where an --overwrite run writes it (`write_shard`) while the published set it
    replaces is still read; `_publish` moves it into place once every shard is written."""
    return f"{base.rstrip('/')}/{SHARD_PROGRESS}/{name}"


def _write_tar(job: ShardJob, dst_fs, path: str) -> ShardResult:
    """The shard's tar at ``path``, its samples checked on the way (`_read_sample`): the bad
    ones are left out and listed in the result."""
    sizes, bad, n = set(), [], 0
    src = url_to_fs(job.src)
    with dst_fs.open(path, "wb") as raw:
        hw = _HashingWriter(raw)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # (POSIX: names past 100 bytes too)
            for stem in job.stems:
                files, shape, problem = _read_sample(job, src, stem)
                if problem:
                    bad.append({"key": f"{job.split}/{stem}", "reason": problem})
                    continue
                sizes.add(shape)
                for mod, data in files.items():
                    tar.addfile(_tarinfo(f"{stem}.{MEMBERS[mod]}", len(data)), io.BytesIO(data))
                n += 1
    return ShardResult(job.name, n, hw.n, hw.sha.hexdigest(), job.plan_hash, sorted([list(s) for s in sizes]), bad,
                       staged=job.stage)


def _earlier_result(dst_fs, path: str, staged: str, record: str, plan_hash: str) -> ShardResult | None:
    """The shard as an earlier run of the same plan finished it (its progress record, with the
    shard still of the size recorded), else None: the shard is written again. A staged shard is
    looked for under its staging name, then at ``path``, where `_publish` moves it (a run killed
    while moving). A record that cannot be read (cut short, edited) counts as none rather than
    block every resume."""
    if not dst_fs.exists(record):
        return None
    try:
        prev = ShardResult(**json.loads(dst_fs.cat_file(record)))
    except (ValueError, TypeError):  # not JSON, or not a record's fields
        return None
    if prev.plan_hash != plan_hash:
        return None
    for where, is_staged in ((staged, True), (path, False)) if prev.staged else ((path, False),):
        if dst_fs.exists(where) and dst_fs.size(where) == prev.num_bytes:
            prev.staged, prev.reused = is_staged, True
            return prev
    return None


def _read_sample(job: ShardJob, src: tuple, stem: str) -> tuple[dict[str, bytes], tuple[int, int], str | None]:
    """One sample's files (``src``: the source's filesystem and path), its image size, and what
    is wrong with it (None when it is fine). Problems name the file by its real path under the
    source (``train/rgb/7.jpg``)."""
    src_fs, src_base = src
    rel = {m: f"{job.split}/{m}/{stem}.{MODALITIES[m]}" for m in job.modalities}
    files = {}
    with storage_errors(job.src):
        for mod, name in rel.items():
            try:
                files[mod] = src_fs.cat_file(f"{src_base.rstrip('/')}/{name}")
            except FileNotFoundError:
                return files, (0, 0), f"{name}: missing file"
            except IsADirectoryError:
                return files, (0, 0), f"{name}: a folder, not a file"
    key = f"{job.split}/{stem}"
    try:
        sample = decode_sample(files["rgb"], files.get("semseg"), files.get("depth"), key=key, names=rel)
    except ValueError as e:  # (the bad-sample list shows the key: not twice, "train/3: train/3: image sizes ...")
        return files, (0, 0), str(e).removeprefix(f"{key}: ")
    return files, tuple(sample["rgb"].shape[:2]), None


def shard_dataset(src: str, dst: str, shard_size: str = "auto", splits: tuple[str, ...] = SPLITS,
                  workers: int | None = None, skip_bad: bool = False, progress: bool = False, overwrite: bool = False) -> dict:
    """Shard ``src`` into ``dst``; returns the manifest (also written to ``dst/manifest.json``).

    Raises ValueError listing bad samples (unless ``skip_bad``) or naming an empty split, a
    bad ``splits`` or ``workers``, a ``dst`` that names a file (`check_destination`) or is a
    Miniscapes folder, or a split an interrupted run began that ``splits`` leaves out; and
    FileExistsError when ``dst`` holds a complete shard set or shard-named files that no run of
    this tool wrote (unless ``overwrite``). No manifest is written then, and a shard set published
    at ``dst`` stays as it was, readable (the shards replacing it are staged: `_publish`).
    The source is listed and checked before anything at ``dst`` changes.
    """
    check_destination(dst)
    check_splits(splits)
    check_workers(workers)
    kind, limit = parse_shard_size(shard_size)
    jobs, skipped, total_bytes, problems = _plan_jobs(src, dst, splits, kind, limit, skip_bad)
    if problems:
        raise ValueError(_problem_text(problems))
    dst_fs, dst_base, kept, replacing = _open_destination(dst, splits, overwrite, [j.name for j in jobs])
    for j in jobs:
        j.stage = replacing
    results = _run(jobs, workers, progress, sum(len(j.stems) for j in jobs), total_bytes)
    for r in results.values():
        problems += [f"{b['key']}: {b['reason']}" for b in r.bad] if not skip_bad else []
    if problems:
        where = (f"the shard set there is as it was, and the shards written wait in {dst.rstrip('/')}/{SHARD_PROGRESS}/ for "
                 f"the same command's rerun" if replacing else "the shards written are kept for the same command's rerun")
        raise ValueError(_problem_text(problems, where))
    manifest = _manifest(src, shard_size, splits, jobs, results, skipped, kept)
    _publish(dst, dst_fs, dst_base, manifest, results, kept, replacing)
    with storage_errors(dst):
        _clean_up(dst_fs, dst_base, manifest, splits)
    return manifest


def _manifest(src: str, shard_size: str, splits: tuple[str, ...], jobs: list[ShardJob], results: dict[str, ShardResult],
              skipped: dict[str, list[dict[str, str]]], kept: dict) -> dict:
    """The new manifest: an entry per split sharded, and the ``kept`` entries of the others.
    ValueError for a split whose every sample was bad (--skip-bad left none)."""
    manifest = {"format": FORMAT, "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": src, "shard_size": shard_size, "splits": {}}
    for split in [s for s in SPLITS if s in splits or s in kept]:
        if split not in splits:
            manifest["splits"][split] = kept[split]  # untouched by this run: its shards stay as they are
            continue
        split_jobs = [j for j in jobs if j.split == split]
        manifest["splits"][split] = _split_entry([results[j.name] for j in split_jobs], split_jobs[0].modalities, skipped[split])
        if not manifest["splits"][split]["num_samples"]:
            raise ValueError(f"{src}: every sample of the {split} split was bad (--skip-bad left none); nothing was published")
    return manifest


def _publish(dst: str, dst_fs, dst_base: str, manifest: dict, results: dict[str, ShardResult], kept: dict,
             replacing: bool) -> None:
    """Put the new set in place: the staged shards move to their names, then the manifest is
    written, last, whole or not at all. A manifest already there (``replacing``) goes before the
    first move, since the shards it lists are about to change, after the entries of the splits
    left alone are saved (`KEPT`): from then until the new one is out nothing is published, which
    an error says, with what to do (a re-run finishes the moves; the shards are kept)."""
    staged = sorted(r.name for r in results.values() if r.staged)  # (also a killed run's, without a manifest now)
    if staged and replacing:
        write_bytes_atomic(f"{dst.rstrip('/')}/{SHARD_PROGRESS}/{KEPT}", json.dumps(kept, indent=1).encode())
        with storage_errors(dst):
            dst_fs.rm(f"{dst_base}/manifest.json")
    try:
        with storage_errors(dst):
            for name in staged:
                if is_local(dst):  # (os.replace: a folder in the way is an error, not a folder to move the shard into)
                    os.replace(_staged(dst_base, name), f"{dst_base}/{name}")
                else:
                    dst_fs.mv(_staged(dst_base, name), f"{dst_base}/{name}")
        if staged:
            sync_local(dst, contents=False)  # (the moves on the disk before the manifest naming their shards)
        # (on a local disk each shard and its name were synced before its record: after a power
        # loss the manifest names no shard that is not there)
        write_bytes_atomic(f"{dst.rstrip('/')}/manifest.json", json.dumps(manifest, indent=1).encode(), sync=True)
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
        if not staged:
            raise
        raise OSError(f"{dst}: putting the new shards in place failed ({e}), the old manifest.json removed: no shard set "
                      f"is published there now; run the same command again to finish (the shards written are kept, and so "
                      f"are the entries of the splits not in --splits)") from e


def check_destination(dst: str) -> None:
    """ValueError for a ``dst`` ending in .json: training takes ``--shards .../manifest.json``,
    so that path gets copied here, where it would become a folder named manifest.json. Or for
    one fsspec would not read literally (`mtl.storage.check_literal`: its deletions match by pattern)."""
    check_named(dst, "--shards")
    check_literal(dst, "--shards")
    if dst.rstrip("/").endswith(".json"):
        folder = dst.rstrip("/").rsplit("/", 1)[0] if "/" in dst.rstrip("/") else "."
        raise ValueError(f"--shards {dst} names a .json file: give the folder (or prefix) that is to hold the shards and "
                         f"their manifest.json, e.g. {folder}")


def _open_destination(dst: str, splits: tuple[str, ...], overwrite: bool, names: list[str]) -> tuple[Any, str, dict, bool]:
    """The destination's filesystem and path, the manifest entries of the splits this run leaves
    alone (`_kept_entries`), and whether a manifest is there (then the new shards are staged).
    All is read and checked before the first write (`_check_destination_holds`). FileNotFoundError
    naming a missing bucket; OSError naming ``dst`` when it cannot be read or written."""
    try:
        with storage_errors(dst):
            dst_fs, dst_base = url_to_fs(dst)
            dst_base = dst_base.rstrip("/")
            raw = read_bytes(f"{dst.rstrip('/')}/manifest.json")
            have = _listing(dst_fs, dst_base)
            ours = _written_before(dst_fs, f"{dst_base}/{SHARD_PROGRESS}")
            marks = folder_marks(dst) if have else []
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
        raise OSError(f"cannot read destination {dst}: {e}") from e
    if marks:
        raise ValueError(f"--shards {dst} is a Miniscapes folder (it holds {', '.join(marks)}): a shard set and its "
                         f"manifest.json need a folder (or prefix) of their own, e.g. {dst.rstrip('/')}-shards")
    old = _old_manifest(dst, raw, splits, overwrite)
    kept = _kept_entries(dst, {n: e.get("size") for n, e in have.items()}, splits, old)
    _check_destination_holds(dst, splits, overwrite, names, have, ours, old or {}, kept)
    progress = f"{dst.rstrip('/')}/{SHARD_PROGRESS}"
    try:
        # the first write, before any worker starts: it makes a local folder, and a missing
        # bucket is a FileNotFoundError naming it (s3fs's makedirs would create the bucket)
        write_bytes_atomic(f"{progress}/{REPLACED}", json.dumps(_replaced(progress, splits, old)).encode())
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise OSError(f"cannot write to destination {dst}: {e}") from e
    return dst_fs, dst_base, kept, old is not None


def _listing(dst_fs, dst_base: str) -> dict[str, dict]:
    """name -> fsspec's entry for what the destination holds ({} when it is not there yet)."""
    dst_fs.invalidate_cache(dst_base)
    try:
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in dst_fs.ls(dst_base, detail=True)}
    except FileNotFoundError:
        return {}


def _check_destination_holds(dst: str, splits: tuple[str, ...], overwrite: bool, names: list[str], have: dict[str, dict],
                             ours: set[str], old: dict, kept: dict) -> None:
    """Refuse what the run would silently lose or replace. ValueError for a split whose shards
    an interrupted run began (``ours``: `_written_before`) that ``splits`` leaves out and no
    manifest entry kept lists: publishing without it would leave its shards unlisted, orphans.
    FileExistsError (unless ``overwrite``) for files named as this run's shards (``names``)
    that no manifest (``old``, ``kept``) or progress record of this tool lists: another set's,
    not this tool's to replace."""
    # (at the destination's top: shards staged in SHARD_PROGRESS go with it once a run publishes)
    left = [s for s in SPLITS if s not in splits and s not in kept and any(n.split("-")[0] == s and n in have for n in ours)]
    if left:
        raise ValueError(f"{dst} holds shards of the {', '.join(left)} split(s) that an interrupted run began and no "
                         f"manifest lists: add {' '.join(left)} to --splits to finish them (without, they would be left "
                         f"unlisted)")
    entries = [*old.get("splits", {}).values(), *kept.values()]
    listed = ours | {s["name"] for e in entries for s in e.get("shards", [])}
    foreign = [n for n in names if have.get(n, {}).get("type") == "file" and n not in listed]
    if foreign and not overwrite:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise FileExistsError(f"{dst} holds {', '.join(foreign[:5])}{more}, named as this run's shards, which no manifest "
                              f"or progress record of this tool lists (another set's?): pass --overwrite to replace "
                              f"them, or choose another --shards")


def _replaced(progress: str, splits: tuple[str, ...], old: dict | None) -> list[str]:
    """The shards the old manifest lists for ``splits``, with those an earlier run recorded in
    `REPLACED` (it removed its manifest, then failed): this tool's, to delete when the new
    manifest does not list them."""
    raw = read_bytes(f"{progress}/{REPLACED}")
    try:
        earlier = json.loads(raw) if raw is not None else []
    except ValueError:  # cut short: those names are not known, and their files stay
        earlier = []
    listed = [s["name"] for split, e in (old or {}).get("splits", {}).items() if split in splits for s in e.get("shards", [])]
    return sorted({n for n in [*earlier, *listed] if isinstance(n, str) and is_shard_name(n)})


def _old_manifest(dst: str, raw: bytes | None, splits: tuple[str, ...], overwrite: bool) -> dict | None:
    """The published manifest at ``dst`` (None: there is none; {}: an unreadable one, whose
    entries cannot be kept), when this run may replace it: FileExistsError unless ``overwrite``."""
    try:
        old = None if raw is None else json.loads(raw)
        if old is not None and not isinstance(old, dict):
            raise ValueError("not an object")
    except ValueError:  # (written by hand, or torn by an older version): nothing in it is kept
        if not overwrite:
            raise FileExistsError(f"{dst}/manifest.json is not a manifest (not a JSON object): pass --overwrite to replace "
                                  f"it and the shards, or choose another --shards") from None
        old = {}
    if old is not None and not overwrite:
        raise FileExistsError(f"{dst} holds a complete shard set ({', '.join(old.get('splits', {}))}): pass --overwrite to "
                              f"replace its {', '.join(splits)} shards, or choose another --shards")
    return old


def _kept_entries(dst: str, have: dict[str, int | None], splits: tuple[str, ...], old: dict | None) -> dict:
    """The manifest entries of the splits not in ``splits``, which the new manifest lists as they
    are: from the old manifest, or when there is none, from the `KEPT` file a run killed while it
    put its shards in place left (it had removed that manifest), provided their shards are still
    there (``have``: name -> size at the destination). FileNotFoundError naming a kept split whose
    shards are gone: listing it would publish shards that cannot be read; leaving it out would
    hide shards the user still has."""
    if old is not None:
        return {k: v for k, v in old.get("splits", {}).items() if k not in splits}
    url = f"{dst.rstrip('/')}/{SHARD_PROGRESS}/{KEPT}"
    try:
        raw = read_bytes(url)
        saved = {} if raw is None else json.loads(raw)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{url} cannot be read ({e}): it holds the manifest entries an earlier --overwrite run kept; "
                         f"delete it and shard those splits again") from None
    kept = {k: v for k, v in saved.items() if k not in splits}
    for split, entry in kept.items():
        lost = [s["name"] for s in entry["shards"] if have.get(s["name"]) != s["num_bytes"]]
        if lost:
            raise FileNotFoundError(f"{dst}: the {split} split, kept from the manifest an earlier --overwrite run replaced "
                                    f"({url}), has lost or changed shard(s) {', '.join(lost[:5])}: add {split} to --splits "
                                    f"to shard it again, or delete {url} to publish without it")
    return kept


# what an fsspec listing says about a file's version, by filesystem: S3's ETag (a content hash
# for single-part uploads), GCS's md5, Azure's etag, a local file's modification time
_VERSION_KEYS = ("ETag", "md5Hash", "etag", "mtime", "LastModified", "updated", "last_modified")


def file_versions(src: str, split: str, mods: tuple[str, ...]) -> dict[str, list[str]]:
    """stem -> the versions of its files (`_VERSION_KEYS`), from one listing per modality: a
    file rewritten in place with the same size still changes them."""
    out: dict[str, list[str]] = {}
    with storage_errors(src):
        fs, base = url_to_fs(src)
        for mod in mods:
            for entry in fs.ls(f"{base.rstrip('/')}/{split}/{mod}", detail=True):
                stem = os.path.splitext(os.path.basename(entry["name"].rstrip("/")))[0]
                out.setdefault(stem, []).append(str(next((entry[k] for k in _VERSION_KEYS if entry.get(k)), "")))
    return out


def _plan_jobs(src: str, dst: str, splits: tuple[str, ...], kind: str, limit: int,
               skip_bad: bool) -> tuple[list[ShardJob], dict[str, list[dict[str, str]]], int, list[str]]:
    """Shard jobs of every split, the samples left out for a missing file (per split), the
    bytes to copy, and the problems that stop the run (missing files unless ``skip_bad``)."""
    jobs, problems, skipped, total_bytes = [], [], {}, 0
    for split in splits:
        mods = split_modalities(src, split)
        samples, missing = scan_split(src, split)
        rel = [m[len(src.rstrip("/")) + 1:] for m in missing]  # train/rgb/7.jpg: a path under --src
        if not samples:
            raise ValueError(_no_samples_text(src, split, mods, rel))
        # 01.jpg beside 1.jpg: both sample 1, which the stream would yield twice (MiniscapesFolder's check)
        stems_by_index([stem for stem, _ in samples], f"{src.rstrip('/')}/{split}/rgb")
        check_keys([stem for stem, _ in samples], f"{src.rstrip('/')}/{split}/rgb")
        skipped[split] = [{"key": f"{split}/{os.path.splitext(os.path.basename(r))[0]}", "reason": f"{r}: missing file"} for r in rel]
        if not skip_bad:
            problems += [f"missing file: {r}" for r in rel]
        plan = plan_shards(samples, kind, limit)
        # a shard of an interrupted run is reused only for the same samples with the same files
        # (their sizes and versions: a sample changed in between is read again, with the rest of
        # its shard) and the same --skip-bad
        sizes, versions = dict(samples), file_versions(src, split, mods)

        def shard_hash(stems: list[str]) -> str:
            what = [src, split, [[stem, sizes[stem], versions.get(stem)] for stem in stems], list(mods), skip_bad]
            return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

        total_bytes += sum(sum(s.values()) for _, s in samples)
        jobs += [ShardJob(split, shard_name(split, i), src, dst, stems, shard_hash(stems), skip_bad, mods)
                 for i, stems in enumerate(plan)]
    return jobs, skipped, total_bytes, problems


def _no_samples_text(src: str, split: str, mods: tuple[str, ...], rel: list[str]) -> str:
    """Why a split has no sample to shard: none at all, or every one lacks a file (``rel``: the
    missing files under ``src``), listed as the folder reader lists them; when no sample has
    a label file at all, the hint that a split without labels has rgb/ only (its empty semseg/
    and depth/ make every sample one that lacks its labels)."""
    where = f"{src.rstrip('/')}/{split}"
    if not rel:
        return f"{where}: no samples to shard"
    stems = {r.rsplit("/", 1)[-1].rsplit(".", 1)[0] for r in rel}
    unlabelled = [m for m in mods if m != "rgb" and sum(r.split("/")[1] == m for r in rel) == len(stems)]
    shown = ", ".join(rel[:10]) + (f" ... ({len(rel)} in all)" if len(rel) > 10 else "")
    hint = (f" ({split}/{'/ and '.join(unlabelled)}/ hold no sample's file: a split without labels has rgb/ only; remove "
            f"them)") if len(unlabelled) == 2 else ""
    return f"{where}: no samples to shard: every sample lacks a file: {shown}{hint}"


def check_keys(stems: list[str], where: str) -> None:
    """ValueError naming the files whose stem holds a dot: a shard member is ``<stem>.rgb.jpg``
    and WebDataset keys a sample by the name up to its first dot, so ``1.5.jpg`` would be
    written fine and then fail in training ("lacks [...]")."""
    dotted = [f"{where}/{stem}.jpg" for stem in stems if "." in stem]
    if dotted:
        more = f" and {len(dotted) - 5} more" if len(dotted) > 5 else ""
        raise ValueError(f"{', '.join(dotted[:5])}{more}: a file name with a dot before its extension cannot be a "
                         f"shard sample (WebDataset cuts its key at the first dot): rename it without the dot")


def _split_entry(shards: list[ShardResult], mods: tuple[str, ...], skipped: list[dict[str, str]]) -> dict:
    image_sizes = sorted({tuple(s) for r in shards for s in r.image_sizes})
    return {
        "num_samples": sum(r.num_samples for r in shards),
        "num_bytes": sum(r.num_bytes for r in shards),
        "modalities": list(mods),  # ["rgb"]: a split without labels (readers: absent = all three)
        "image_size": list(image_sizes[0]) if len(image_sizes) == 1 else None,
        "image_sizes": [list(s) for s in image_sizes],
        "shards": [{"name": r.name, "num_samples": r.num_samples, "num_bytes": r.num_bytes, "sha256": r.sha256} for r in shards],
        "skipped": skipped + [b for r in shards for b in r.bad],
    }


def _clean_up(dst_fs, dst_base: str, manifest: dict, splits: tuple[str, ...]) -> None:
    """Once the manifest is out: the shards of ``splits`` this tool wrote or published before
    (`_written_before`) that the new manifest does not list (an earlier, different plan's), then
    the progress records. Any other file at the destination is not this tool's and stays."""
    progress = f"{dst_base}/{SHARD_PROGRESS}"
    listed = {s["name"] for sp in manifest["splits"].values() for s in sp["shards"]}
    stale = {n for n in _written_before(dst_fs, progress) - listed if n.split("-")[0] in splits}
    dst_fs.invalidate_cache(dst_base)
    for path in dst_fs.ls(dst_base, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] in stale:
            dst_fs.rm(path)
    if dst_fs.exists(progress):
        dst_fs.rm(progress, recursive=True)


def _written_before(dst_fs, progress: str) -> set[str]:
    """The shard names this tool wrote at the destination: a progress record per shard written
    (`write_shard`) and `REPLACED`, the shards of the manifests this run and failed earlier runs
    replaced."""
    dst_fs.invalidate_cache(progress)
    if not dst_fs.exists(progress):
        return set()
    records = {p.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json").removesuffix(PENDING)
               for p in dst_fs.ls(progress, detail=False)}
    try:
        replaced = json.loads(dst_fs.cat_file(f"{progress}/{REPLACED}"))
    except (FileNotFoundError, ValueError):
        replaced = []
    return {n for n in [*records, *replaced] if isinstance(n, str) and is_shard_name(n)}


def _problem_text(problems: list[str], left: str = "") -> str:
    """The bad samples, listed (``left``: what a failed run leaves at the destination)."""
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return (f"{len(problems)} bad sample(s); nothing was published{f' ({left})' if left else ''} (mend them, or rerun with "
            f"--skip-bad to leave them out, which writes every shard again):\n  {shown}{more}")


def _run(jobs: list[ShardJob], workers: int | None, progress: bool, total_samples: int, total_bytes: int) -> dict[str, ShardResult]:
    """Write the shards on ``workers`` processes (default: one per usable CPU, `usable_cpus`), 2
    per worker handed out ahead. A worker killed under the run (the kernel's OOM killer) is a BrokenProcessPool saying what to do."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = max(1, min(workers or usable_cpus(), len(jobs) or 1))
    cols = (TextColumn("sharding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"), TimeRemainingColumn())
    try:
        with Progress(*cols, disable=not progress) as bar, worker_pool(workers) as pool:
            return _collect(pool, jobs, 2 * workers, bar, bar.add_task("shard", total=total_samples, speed=""))
    except BrokenProcessPool:
        raise BrokenProcessPool(f"a sharding worker died (out of memory?): lower --workers (this run had {workers})") from None


def _collect(pool: ProcessPoolExecutor, jobs: list[ShardJob], window: int, bar, task) -> dict[str, ShardResult]:
    """Write the shards (`data_prep.pool.run_pooled`: ``window`` at a time, an I/O error stops the
    run and no manifest is written), advancing the progress bar as they finish."""
    results: dict[str, ShardResult] = {}
    t0, done_bytes = time.perf_counter(), 0

    def done(r: ShardResult) -> None:
        nonlocal done_bytes
        results[r.name] = r
        done_bytes += r.num_bytes
        dt = max(time.perf_counter() - t0, 1e-6)
        bar.update(task, advance=r.num_samples + len(r.bad),
                   speed=f"{bar.tasks[0].completed / dt:.0f} samples/s, {done_bytes / dt / 1e6:.1f} MB/s")

    run_pooled(pool, write_shard, jobs, window, done)
    return results


def summary_table(manifest: dict, seconds: float):
    from rich.table import Table

    t = Table(title=f"shards written in {seconds:.1f}s")
    for c in ("split", "shards", "samples", "skipped", "MB", "image size"):
        t.add_column(c, justify="right")
    for split, s in manifest["splits"].items():
        size = "x".join(map(str, s["image_size"])) if s["image_size"] else f"{len(s['image_sizes'])} sizes"
        t.add_row(split, str(len(s["shards"])), str(s["num_samples"]), str(len(s["skipped"])), f"{s['num_bytes'] / 1e6:.1f}", size)
    return t


@dataclass(frozen=True)
class ShardCommand:
    root: Annotated[str, tyro.conf.arg(aliases=("--src",))]  # the Miniscapes folder to shard (local or fsspec URL), as training's --root
    #: where the shard set goes (local folder or fsspec URL, e.g. s3://bucket/prefix): what training's --shards then reads
    shards: Annotated[str, tyro.conf.arg(aliases=("--dst",))]
    shard_size: Annotated[str, tyro.conf.arg(help=SHARD_SIZE_HELP)] = "auto"
    splits: tuple[Split, ...] = SPLITS  # the splits to shard
    workers: int | None = None  # parallel processes; default: the CPUs this process may run on
    skip_bad: bool = False  # leave bad samples out (counted in the manifest) instead of failing
    #: replace the --splits shards of a complete shard set at --shards (the others stay), and
    #: shard-named files there that no manifest of this tool lists
    overwrite: bool = False
    endpoint_url: str | None = None  # S3 endpoint (MinIO, moto...); default: $AWS_ENDPOINT_URL


def _check_command(a: ShardCommand) -> None:
    parse_shard_size(a.shard_size)
    check_splits(tuple(a.splits))
    check_workers(a.workers)


def main(argv: list[str] | None = None) -> int:
    a = parse(ShardCommand, argv, description=__doc__, check=_check_command)
    if a.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = a.endpoint_url  # inherited by the worker processes
    from mtl.progress import wide_console

    t0 = time.perf_counter()
    try:
        manifest = shard_dataset(a.root, a.shards, a.shard_size, tuple(a.splits), a.workers, a.skip_bad, progress=True,
                                 overwrite=a.overwrite)
    except (ValueError, FileNotFoundError, OSError, BrokenProcessPool) as e:
        print(f"error: {no_space(e) or e}", file=sys.stderr)
        return 2
    wide_console().print(summary_table(manifest, time.perf_counter() - t0))
    print(f"manifest: {a.shards.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
