"""Cityscapes (the official download) -> a Miniscapes folder that training, evaluation and
``data_prep.shard`` read unchanged.

    python -m data_prep.cityscapes --root data/cityscapes --out data/cityscapes-256x512 --size 256x512
    python -m data_prep.cityscapes --root s3://bucket/cityscapes --out s3://bucket/cs-256x512 --workers 16

Miniscapes, the course's data set, is a derivative of Cityscapes that cannot be downloaded; this
tool rebuilds its kind from the packages anyone with a Cityscapes account can get
(``leftImg8bit``, ``gtFine``, ``disparity``, ``camera``; ``*_trainvaltest.zip``). Per image
``<city>_<seq>_<frame>``:

* rgb: ``leftImg8bit`` resized with Lanczos (antialiased), written as JPEG.
* semseg: ``gtFine/*_labelIds.png`` through the official label table (cityscapesScripts'
  ``labels.py``, the same order as torchvision's ``Cityscapes.classes``): 7 road -> 0 ...
  33 bicycle -> 18; every other id (void 0, guard rail 14, ... and 255, i.e. license plate
  -1 as a byte) -> 255.
* depth: ``disparity/*_disparity.png`` is 16-bit: p > 0 -> d = (p - 1) / 256 pixels, p = 0
  invalid. Depth = baseline * fx / d in metres with that image's ``camera/*_camera.json``
  (``extrinsic.baseline``, ``intrinsic.fx``), computed at the ORIGINAL resolution with the
  original fx (a resize scales d and fx alike, so depth in metres does not depend on it; the
  disparity is never resampled as a number). d = 0 (p = 1) is "farther than anything" and
  becomes 300 m; depths are clipped to 4-300 m and written with the Miniscapes codec
  (`mtl.data.miniscapes.encode_depth_png`, 0 = invalid).
* labels and depth are resized with nearest neighbour on the same sampling grid: every output
  pixel is one real source pixel's class and one real measured depth, of the same pixel. Any
  averaging of depth would invent depths between a car and the wall behind it, and of labels
  classes that are not there; a validity-aware min/median pool would avoid that too but would
  let depth and class come from different source pixels at object borders.
* test: rgb only (Cityscapes publishes no test labels).

Indices are positions in each split sorted by (city, file name), so a re-run gives the same
indices; ``index.csv`` (split, index, city, stem) maps them back to Cityscapes names.
``conversion.json`` records what was converted (size, JPEG quality, the sample list's hash).

Every sample is checked before anything is written (a label, disparity or camera file missing
for a train/val image is an error naming it) and while it is converted (unreadable or
wrong-mode PNG, a camera file without a positive baseline/fx, image sizes that disagree: errors
naming the file); each written sample is decoded again with the Miniscapes reader.

Atomic and resumable. A local ``--out`` is built in ``<out>.partial`` and renamed into place
after ``index.csv`` is written, so ``<out>`` appears whole or not at all (`mtl.atomic.atomic_dir`
does the same with a throw-away folder; this one keeps a stable name so that it can be resumed).
On an fsspec URL (rename is a copy on object stores) the files go straight to ``<out>`` and
``index.csv`` is written last: it is the completion marker, and ``<out>`` without it is an
unfinished conversion, which the project's readers refuse (`mtl.data.folder.split_modalities`). A re-run of the same conversion (same sample list, size and quality)
resumes: every file is written whole (temporary file + rename locally, one PUT on object
stores), samples with all their files are kept, the others are converted again (the output is a
deterministic function of the input). A re-run of a complete conversion does nothing; a folder
holding another conversion or other files is refused unless ``--overwrite``. An ``--out`` that is
``--root`` or a folder above it is refused whatever ``--overwrite`` says: replacing it would delete
the Cityscapes source. A local ``--out`` that is a link is followed (its target is replaced,
``.partial`` beside it); one that is a file is refused before anything is converted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import tyro
from PIL import Image

from data_prep.pool import run_pooled
from mtl.atomic import check_not_above, check_not_here
from mtl.cli import parse
from mtl.config import Size
from mtl.errors import no_space
from mtl.data.miniscapes import (CONVERSION_INDEX, CONVERSION_PLAN, DEPTH_MAX_M, MODALITIES, SPLITS, Split, check_splits,
                                 decode_sample, encode_depth_png, encode_rgb_jpeg, encode_semseg_png)
from mtl.machine import check_workers, usable_cpus, worker_pool
from mtl.storage import check_literal, check_named, exists, folder_names, is_local, storage_errors, sync_local, url_to_fs, write_bytes_atomic

FORMAT = "streetmtl-cityscapes-v1"
INDEX, PLAN = CONVERSION_INDEX, CONVERSION_PLAN  # written last (the completion marker) and first
LABELLED = ("train", "val")

# kind -> (package folder, file suffix after the stem, the download that holds it)
SOURCES = {
    "rgb": ("leftImg8bit", "_leftImg8bit.png", "leftImg8bit_trainvaltest.zip"),
    "labels": ("gtFine", "_gtFine_labelIds.png", "gtFine_trainvaltest.zip"),
    "disparity": ("disparity", "_disparity.png", "disparity_trainvaltest.zip"),
    "camera": ("camera", "_camera.json", "camera_trainvaltest.zip"),
}

# cityscapesScripts labels.py: label id -> train id of the 19 evaluated classes
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def train_id_lut() -> np.ndarray:
    """A 256-entry table: label id byte -> train id, 255 for every id not evaluated."""
    lut = np.full(256, 255, np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


_LUT = train_id_lut()


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    city: str
    stem: str  # <city>_<seq>_<frame>

    def rel(self, kind: str) -> str:
        folder, suffix, _ = SOURCES[kind]
        return f"{folder}/{self.split}/{self.city}/{self.stem}{suffix}"

    def out_rel(self, mod: str) -> str:
        return f"{self.split}/{mod}/{self.index}.{MODALITIES[mod]}"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


# ------------------------------------------------------------------------ planning

def _find(fs, base: str, folder: str) -> set[str]:
    """Paths (relative to ``base``) of the files under ``base/folder``; empty if it is absent."""
    top = _join(base, folder)
    if not fs.isdir(top):
        return set()
    return {p[len(base.rstrip("/")) + 1:] for p in fs.find(top)}


def _split_samples(fs, base: str, root: str, split: str) -> tuple[list[tuple[str, str]], list[str]]:
    """One split's (city, stem) pairs in (city, name) order, and its problems (missing files)."""
    folder, suffix, package = SOURCES["rgb"]
    parts = [p.split("/") for p in _find(fs, base, f"{folder}/{split}") if p.endswith(suffix)]
    pairs = sorted((q[2], q[3][: -len(suffix)]) for q in parts if len(q) == 4)  # <folder>/<split>/<city>/<file>
    if not pairs:
        return [], [f"no *{suffix} images in {_join(root, folder, split)}/<city>/ (from {package}; or leave the split out with --splits)"]
    problems = []
    if split in LABELLED:
        for kind in ("labels", "disparity", "camera"):
            have = _find(fs, base, f"{SOURCES[kind][0]}/{split}")
            need = [Sample(split, 0, c, s).rel(kind) for c, s in pairs]
            missing = [n for n in need if n not in have]
            problems += [f"missing file: {_join(root, n)} (from {SOURCES[kind][2]})" for n in missing]
    return pairs, problems


def plan_samples(root: str, splits: tuple[str, ...]) -> list[Sample]:
    """Every sample to convert, with its new index. ValueError listing the missing files."""
    with storage_errors(root):
        fs, base = url_to_fs(root)
        if not fs.isdir(base):
            raise FileNotFoundError(f"no such Cityscapes folder: {root}")
        samples, problems = [], []
        for split in splits:
            pairs, bad = _split_samples(fs, base, root, split)
            problems += bad
            samples += [Sample(split, i, city, stem) for i, (city, stem) in enumerate(pairs)]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{len(problems)} problem(s) in {root}; nothing was written:\n  {shown}")
    return samples


def plan_record(samples: list[Sample], size: tuple[int, int], quality: int) -> dict:
    """What makes two conversions the same (a resumable one, or an up-to-date one)."""
    listing = json.dumps([[s.split, s.index, s.city, s.stem] for s in samples]).encode()
    counts = {sp: sum(s.split == sp for s in samples) for sp in dict.fromkeys(s.split for s in samples)}
    return {"format": FORMAT, "size": list(size), "jpeg_quality": quality, "counts": counts,
            "samples_sha256": hashlib.sha256(listing).hexdigest()}


# ------------------------------------------------------------------------ one sample

def read_camera(data: bytes, name: str) -> tuple[float, float]:
    """(baseline in m, fx in pixels) from a Cityscapes camera JSON; ValueError naming the file."""
    try:
        cam = json.loads(data)
        baseline, fx = float(cam["extrinsic"]["baseline"]), float(cam["intrinsic"]["fx"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{name}: not a Cityscapes camera file (needs extrinsic.baseline and intrinsic.fx): {e!r}") from None
    if not (np.isfinite(baseline) and np.isfinite(fx) and baseline > 0 and fx > 0):
        raise ValueError(f"{name}: baseline {baseline} and fx {fx} must be positive")
    return baseline, fx


def disparity_to_depth(raw: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """Cityscapes 16-bit disparity values -> depth in metres (0 = invalid, inf = disparity 0)."""
    raw = np.asarray(raw, np.float64)
    d = (raw - 1.0) / 256.0  # pixels
    with np.errstate(divide="ignore"):
        depth = np.where(d > 0, baseline * fx / np.where(d > 0, d, 1.0), np.inf)
    return np.where(raw > 0, depth, 0.0)


def _open_png(data: bytes, name: str, modes: tuple[str, ...]) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"{name}: cannot decode PNG ({e})") from None
    if img.format != "PNG" or img.mode not in modes:
        raise ValueError(f"{name}: expected a {' or '.join(modes)} PNG, got a {img.format} of mode {img.mode}")
    return img


def nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (pixel centres), the same grid for every map of a sample."""
    h, w = size
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
    return a[rows[:, None], cols[None, :]]


def convert_sample(src: tuple, root: str, s: Sample, size: tuple[int, int], quality: int) -> dict[str, bytes]:
    """The Miniscapes files of one sample (rgb only for the test split)."""
    fs, base = src
    names = {k: _join(root, s.rel(k)) for k in SOURCES}
    with storage_errors(root):
        raw = {k: fs.cat_file(_join(base, s.rel(k))) for k in (SOURCES if s.split in LABELLED else ("rgb",))}
    rgb = _open_png(raw["rgb"], names["rgb"], ("RGB", "RGBA")).convert("RGB")
    small = rgb.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    out = {"rgb": encode_rgb_jpeg(np.asarray(small), quality=quality)}
    if s.split not in LABELLED:
        return out
    ids = np.asarray(_open_png(raw["labels"], names["labels"], ("L", "P")))
    disp = np.asarray(_open_png(raw["disparity"], names["disparity"], ("I;16", "I;16B", "I")))
    shapes = {names["rgb"]: (rgb.height, rgb.width), names["labels"]: ids.shape, names["disparity"]: disp.shape}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{s.stem}: image sizes (HxW) disagree: " + ", ".join(f"{n} {h}x{w}" for n, (h, w) in shapes.items()))
    depth = disparity_to_depth(disp, *read_camera(raw["camera"], names["camera"]))
    depth = np.where(np.isinf(depth), DEPTH_MAX_M, depth)  # disparity 0: farther than the codec's range
    out["semseg"] = encode_semseg_png(nearest(_LUT[ids], size))
    out["depth"] = encode_depth_png(nearest(depth, size))  # depth <= 0: invalid
    return out


# ------------------------------------------------------------------------ running

@dataclass(frozen=True)
class Job:
    root: str
    dest: str  # where the files go (the .partial folder of a local --out)
    samples: tuple[Sample, ...]
    size: tuple[int, int]
    quality: int


def convert_chunk(job: Job) -> int:
    """Convert and write a few samples; each file is written whole, rgb last (a sample counts
    as finished when all its files exist). Returns the number of samples written."""
    src = url_to_fs(job.root)
    for s in job.samples:
        files = convert_sample(src, job.root, s, job.size, job.quality)
        decode_sample(files["rgb"], files.get("semseg"), files.get("depth"), key=f"{job.root} {s.stem}")
        for mod in sorted(files, key=lambda m: m == "rgb"):
            write_bytes_atomic(_join(job.dest, s.out_rel(mod)), files[mod])
    return len(job.samples)


def finished(dest: str, samples: list[Sample]) -> set[tuple[str, int]]:
    """(split, index) of the samples whose files all exist in ``dest`` (one listing per folder)."""
    with storage_errors(dest):
        fs, base = url_to_fs(dest)
        have: dict[tuple[str, str], set[str]] = {}
        for split in dict.fromkeys(s.split for s in samples):
            for mod in MODALITIES:
                folder = _join(base, split, mod)
                have[split, mod] = {os.path.basename(p) for p in fs.ls(folder, detail=False)} if fs.isdir(folder) else set()
    done = set()
    for s in samples:
        mods = MODALITIES if s.split in LABELLED else ("rgb",)
        if all(os.path.basename(s.out_rel(m)) in have[s.split, m] for m in mods):
            done.add((s.split, s.index))
    return done


def run_jobs(jobs: list[Job], workers: int, progress: bool, total: int, already: int) -> None:
    """Run the jobs (in this process when ``workers`` is 1), with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"), TimeRemainingColumn())
    t0 = time.perf_counter()
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("convert", total=total, completed=already, speed="")

        def advance(n: int) -> None:
            rate = (bar.tasks[0].completed + n - already) / max(time.perf_counter() - t0, 1e-6)
            bar.update(task, advance=n, speed=f"{rate:.1f} samples/s")

        if workers <= 1:
            for job in jobs:
                advance(convert_chunk(job))
            return
        _run_pool(jobs, workers, advance)


def _run_pool(jobs: list[Job], workers: int, advance) -> None:
    """The jobs on ``workers`` processes; the first error stops the run (no index.csv). A worker
    killed under the run (the kernel's OOM killer) is a BrokenProcessPool saying what to do."""
    try:
        with worker_pool(workers) as pool:
            run_pooled(pool, convert_chunk, jobs, 2 * workers, advance)
    except BrokenProcessPool:
        raise BrokenProcessPool(f"a conversion worker died (out of memory?): lower --workers (this run had {workers})") from None


# ------------------------------------------------------------------------ destination

def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def _is_complete(out: str, plan: dict) -> bool | None:
    """True: ``out`` is this conversion, complete; False: it holds something else (another
    conversion, other files); None: nothing there (or, on a URL, this conversion unfinished)."""
    with storage_errors(out):
        fs, base = url_to_fs(out)
        if not fs.isdir(base) or not fs.ls(base, detail=False):
            return None
        done = fs.exists(_join(base, INDEX))
        same = _read_json(fs, _join(base, PLAN)) == plan
    if done and same:
        return True
    return None if (same and not is_local(out)) else False


def claim(dest: str, plan: dict, overwrite: bool) -> bool:
    """Make ``dest`` the working folder of this conversion; True when it resumes one."""
    with storage_errors(dest):
        fs, base = url_to_fs(dest)
        if fs.isdir(base) and fs.ls(base, detail=False):
            old = _read_json(fs, _join(base, PLAN))
            if old == plan and not overwrite:
                return True
            if not overwrite:
                what = "another conversion (other samples, size or quality)" if old is not None else "other files"
                raise FileExistsError(f"{dest} holds {what}: pass --overwrite to replace it")
            fs.rm(base, recursive=True)
    write_bytes_atomic(_join(dest, PLAN), json.dumps(plan, indent=1).encode())
    return False


def index_csv(samples: list[Sample]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "index", "city", "stem"])
    w.writerows([s.split, s.index, s.city, s.stem] for s in samples)
    return buf.getvalue().encode()


def publish(dest: str, out: str, samples: list[Sample]) -> None:
    """Write the index last; a local ``.partial`` folder then replaces ``out`` in one rename."""
    if is_local(out):
        base = url_to_fs(dest)[1]
        for folder, _, files in os.walk(base):  # temporary files of writes an interruption cut short
            for f in files:
                if ".tmp-" in f:
                    os.remove(os.path.join(folder, f))
    write_bytes_atomic(_join(dest, INDEX), index_csv(samples))
    if is_local(out):
        sync_local(dest)  # (a power loss after the rename leaves no index naming files not on the disk)
        target = url_to_fs(out)[1]
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(url_to_fs(dest)[1], target)
        sync_local(out, contents=False)


# ------------------------------------------------------------------------ the conversion

def check_out(root: str, out: str) -> None:
    """ValueError when ``out`` (or a local one's ``.partial`` working folder) is ``root``, a
    folder above it, or a folder of it that holds more than a conversion's output, whatever
    ``--overwrite`` says: the conversion replaces that folder whole, which would delete the
    Cityscapes source it reads (`mtl.atomic.check_not_above`), or the folder this command runs
    in or one above it (`mtl.atomic.check_not_here`). Or when fsspec would not read ``out``
    literally (`mtl.storage.check_literal`)."""
    check_literal(out, "--out")
    check_not_here(out)
    check_not_above(out, [root], _earlier_conversion(out))
    if is_local(out):
        partial = out.removeprefix("file://").rstrip("/") + ".partial"
        check_not_above(partial, [root], _earlier_conversion(partial))


def resolve_out(out: str) -> str:
    """``out`` as the conversion writes it: a local link followed (as `mtl.atomic.output_dir`
    does: its target is what gets replaced, with ``.partial`` beside it on its own disk; renaming
    onto the link would fail after the whole conversion). FileExistsError, before anything is
    read, for an ``out`` (or a local one's ``.partial``) that is a file, not a folder."""
    check_named(out, "--out")
    if is_local(out):
        out = os.path.realpath(out.removeprefix("file://"))
        for path in (out, out + ".partial"):
            if os.path.exists(path) and not os.path.isdir(path):
                raise FileExistsError(f"--out {path} is a file, not a folder: give a folder (new, or an earlier conversion)")
        return out
    with storage_errors(out):
        fs, base = url_to_fs(out)
        if fs.exists(base) and not fs.isdir(base):
            raise FileExistsError(f"--out {out} is a file, not a folder (prefix): give a folder (new, or an earlier conversion)")
    return out


def _earlier_conversion(folder: str) -> list[str]:
    """What ``folder`` holds when it is an earlier conversion (its plan, written first, is there:
    one kept inside the source is resumed or replaced), else nothing: Cityscapes' own gtFine/
    holds train/, val/ and test/ too."""
    return folder_names(folder) if exists(_join(folder, PLAN)) else []


def convert(root: str, out: str, size: tuple[int, int] = (256, 512), splits: tuple[str, ...] = SPLITS, quality: int = 90,
            workers: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Convert the Cityscapes folder ``root`` into the Miniscapes folder ``out`` (both local or
    fsspec URLs). Returns a summary: ``counts`` per split, ``converted`` and ``kept`` samples,
    ``state`` ("converted", "resumed" or "up to date"). ValueError, before anything is read or
    written, for bad ``splits`` (`check_splits`) or ``workers`` or an ``out`` holding ``root``
    (`check_out`), and FileExistsError for an ``out`` that is a file (`resolve_out`)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"--jpeg-quality must be 1..100, got {quality}")
    check_splits(splits)
    check_workers(workers)
    out = resolve_out(out)
    check_out(root, out)
    samples = plan_samples(root, splits)
    plan = plan_record(samples, size, quality)
    summary = {"counts": plan["counts"], "converted": 0, "kept": len(samples), "state": "up to date"}
    state = _is_complete(out, plan)
    if state and not overwrite:
        return summary
    if state is False and not overwrite:
        raise FileExistsError(f"{out} exists and is not this conversion: pass --overwrite to replace it")
    dest = out.rstrip("/") + ".partial" if is_local(out) else out.rstrip("/")
    resumed = claim(dest, plan, overwrite)
    done = finished(dest, samples) if resumed else set()
    todo = [s for s in samples if (s.split, s.index) not in done]
    workers = max(1, min(workers or usable_cpus(), len(todo) or 1))
    step = max(1, min(16, -(-len(todo) // (4 * workers))))
    jobs = [Job(root, dest, tuple(todo[i:i + step]), size, quality) for i in range(0, len(todo), step)]
    run_jobs(jobs, workers, progress, len(samples), len(done))
    publish(dest, out, samples)
    summary.update(converted=len(todo), kept=len(done), state="resumed" if resumed else "converted")
    return summary


@dataclass(frozen=True)
class CityscapesCommand:
    #: the Cityscapes folder (local or fsspec URL) holding leftImg8bit/, gtFine/, disparity/ and camera/
    root: Annotated[str, tyro.conf.arg(aliases=("--src",))]
    out: str  # the Miniscapes folder to write (local or fsspec URL): what training's --root then reads
    size: Size = (256, 512)  # output image size HxW
    splits: tuple[Split, ...] = SPLITS  # the splits to convert (test: rgb only)
    jpeg_quality: int = 90  # JPEG quality of the rgb images
    workers: int | None = None  # parallel processes; default: the CPUs this process may run on
    overwrite: bool = False  # replace an --out holding something else, and start an unfinished conversion over
    endpoint_url: str | None = None  # S3 endpoint (MinIO, moto...); default: $AWS_ENDPOINT_URL


def main(argv: list[str] | None = None) -> int:
    a = parse(CityscapesCommand, argv, description=__doc__, check=lambda a: (check_splits(tuple(a.splits)), check_workers(a.workers)))
    if a.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = a.endpoint_url  # inherited by the worker processes
    t0 = time.perf_counter()
    try:
        s = convert(a.root, a.out, a.size, tuple(a.splits), a.jpeg_quality, a.workers, a.overwrite, progress=True)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, BrokenProcessPool) as e:
        print(f"error: {no_space(e) or e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items())
    print(f"{s['state']}: {a.out} ({counts}; {s['converted']} converted, {s['kept']} kept) "
          f"in {time.perf_counter() - t0:.1f}s; index: {_join(a.out, INDEX)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
