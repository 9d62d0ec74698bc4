"""Cityscapes -> Miniscapes (data_prep.cityscapes) on a tiny tree in the official layout: train
ids and depths checked pixel by pixel against values computed here, the index, errors that name
the file, atomic and resumable output (local and fsspec URL), and the result read, sharded and
trained on by the project's own tools."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep.cityscapes import LABEL_TO_TRAIN_ID, check_out, convert
from mtl.data.folder import MiniscapesFolder
from mtl.data.miniscapes import CLASS_NAMES, decode_depth, decode_rgb, decode_semseg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_HW, OUT_HW = (32, 64), (16, 32)
# split -> [(city, stem)], given out of order: indices follow (city, name)
IMAGES = {
    "train": [("bochum", "bochum_000000_000313"), ("aachen", "aachen_000001_000019")],
    "val": [("frankfurt", "frankfurt_000000_000294")],
    "test": [("berlin", "berlin_000000_000019")],
}
CAMERAS = {"aachen": (0.209313, 2262.52), "bochum": (0.22, 2000.0), "frankfurt": (0.21, 2250.0)}
# by hand, from cityscapesScripts' labels.py: label id -> train id; anything else -> 255
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
HALF_STEP = (1 / 4 - 1 / 300) / 254 / 2  # half a uint8 code of disparity, in 1/m


def _png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _blocks(rng: np.random.Generator, values: np.ndarray, dtype) -> np.ndarray:
    """A source-size map constant on 2x2 blocks: the output pixel of each block is unambiguous."""
    grid = rng.choice(values, size=OUT_HW).astype(dtype)
    return np.kron(grid, np.ones((2, 2), dtype)).astype(dtype)


def make_tree(root: str) -> dict:
    """The Cityscapes files; returns each labelled image's label ids, raw disparity and camera."""
    rng = np.random.default_rng(0)
    ids = np.array([0, 1, 4, 6, 9, 14, 15, 18, 29, 30, 255] + list(OFFICIAL))  # void, non-evaluated, license plate (-1 as a byte)
    disparities = np.concatenate([[0, 0, 0, 1, 2, 60000, 65535], rng.integers(300, 40000, 40)])
    truth = {}
    for split, images in IMAGES.items():
        for city, stem in images:
            rgb = rng.integers(0, 256, (*SRC_HW, 3), dtype=np.uint8)
            _png(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", rgb)
            if split == "test":
                continue
            labels, disp = _blocks(rng, ids, np.uint8), _blocks(rng, disparities, np.uint16)
            _png(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", labels)
            _png(f"{root}/disparity/{split}/{city}/{stem}_disparity.png", disp)
            baseline, fx = CAMERAS[city]
            path = f"{root}/camera/{split}/{city}/{stem}_camera.json"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                json.dump({"extrinsic": {"baseline": baseline, "pitch": 0.038}, "intrinsic": {"fx": fx, "fy": fx, "u0": 1100, "v0": 500}}, fh)
            truth[stem] = (labels, disp, baseline, fx)
    return truth


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("cityscapes")
    truth = make_tree(str(base / "cs"))
    out = base / "mini"
    r = subprocess.run([sys.executable, "-m", "data_prep.cityscapes", "--root", str(base / "cs"), "--out", str(out),
                        "--size", "16x32", "--workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "train 2, val 1, test 1" in r.stdout, r.stdout
    return str(base / "cs"), str(out), truth


def test_table_agrees_with_torchvision():
    from torchvision.datasets import Cityscapes

    assert LABEL_TO_TRAIN_ID == OFFICIAL
    evaluated = [c for c in Cityscapes.classes if not c.ignore_in_eval]
    assert {c.id: c.train_id for c in evaluated} == OFFICIAL
    assert tuple(c.name for c in sorted(evaluated, key=lambda c: c.train_id)) == CLASS_NAMES


def test_train_ids_and_depth_pixel_by_pixel(converted):
    _, out, truth = converted
    rows = list(csv.DictReader(open(f"{out}/index.csv")))
    for row in rows:
        if row["split"] == "test":
            continue
        labels, disp, baseline, fx = truth[row["stem"]]
        small_ids, small_p = labels[::2, ::2], disp[::2, ::2].astype(np.float64)
        expected_ids = np.vectorize(lambda i: OFFICIAL.get(int(i), 255))(small_ids)
        got = decode_semseg(open(f"{out}/{row['split']}/semseg/{row['index']}.png", "rb").read())
        np.testing.assert_array_equal(got, expected_ids)
        assert (got == 255).any() and (got < 19).any()

        depth, valid = decode_depth(open(f"{out}/{row['split']}/depth/{row['index']}.png", "rb").read())
        np.testing.assert_array_equal(valid, small_p > 0)
        with np.errstate(divide="ignore"):
            metres = np.where(small_p > 1, baseline * fx * 256.0 / (small_p - 1), 300.0)  # p = 1: disparity 0
        expected = np.clip(metres, 4.0, 300.0)
        err = np.abs(1 / depth[valid] - 1 / expected[valid])
        assert err.max() <= HALF_STEP + 1e-7, err.max()
        assert (~valid).any() and (expected[valid] == 4.0).any() and (expected[valid] == 300.0).any()
        assert ((expected[valid] > 4) & (expected[valid] < 300)).any()


def test_index_splits_and_rgb(converted):
    _, out, _ = converted
    rows = list(csv.DictReader(open(f"{out}/index.csv")))
    assert [(r["split"], r["index"], r["city"], r["stem"]) for r in rows] == [
        ("train", "0", "aachen", "aachen_000001_000019"), ("train", "1", "bochum", "bochum_000000_000313"),
        ("val", "0", "frankfurt", "frankfurt_000000_000294"), ("test", "0", "berlin", "berlin_000000_000019")]
    assert sorted(os.listdir(f"{out}/test")) == ["rgb"]  # no labels published for test
    assert sorted(os.listdir(f"{out}/train")) == ["depth", "rgb", "semseg"]
    assert decode_rgb(open(f"{out}/test/rgb/0.jpg", "rb").read()).shape == (*OUT_HW, 3)
    assert not os.path.exists(out + ".partial")


def test_project_reads_shards_and_trains_on_it(converted, tmp_path, in_process):
    """The converted set through the project's commands (their mains in this process)."""
    from data_prep import shard
    from jobs import train

    _, out, _ = converted
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        folder = MiniscapesFolder(out, split)
        assert len(folder) == n and tuple(folder[0]["rgb"].shape) == (*OUT_HW, 3)
    assert not MiniscapesFolder(out, "test").has_labels
    r = in_process(shard.main, ["--root", out, "--shards", str(tmp_path / "shards")])
    assert r.returncode == 0, r.stderr
    manifest = json.load(open(tmp_path / "shards" / "manifest.json"))
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    r = in_process(train.main, ["--local", "--root", converted[0], "--out", str(tmp_path / "runs")])  # the download itself
    assert r.returncode == 2 and (f"Miniscapes folder missing: {converted[0]}/train/rgb (it is a Cityscapes download: convert it "
                                  f"first, `python -m data_prep.cityscapes --root {converted[0]} --out <folder>") in r.stderr, r.stderr
    r = in_process(train.main, ["--local", "--root", out, "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "2",
                                "--encoder", "resnet18", "--workers", "0", "--out", str(tmp_path / "runs")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def test_a_cityscapes_download_given_as_miniscapes_says_what_to_do(tmp_path, monkeypatch):
    """Its zips: unzip, then convert; a part of it (leftImg8bit/): convert the folder holding it."""
    from mtl.data.folder import split_modalities

    (tmp_path / "zips").mkdir()
    (tmp_path / "zips/leftImg8bit_trainvaltest.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"zips/train/rgb \(it holds a Cityscapes download's zips: unzip gtFine, leftImg8bit, "
                                                r"disparity and camera \*_trainvaltest.zip into one folder, then convert it"):
        split_modalities(str(tmp_path / "zips"), "train")
    (tmp_path / "cs/leftImg8bit/train/aachen").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"\(it is a part of a Cityscapes download: convert the folder holding it, `python "
                                                rf"-m data_prep.cityscapes --root {tmp_path}/cs --out"):
        split_modalities(str(tmp_path / "cs/leftImg8bit"), "train")
    monkeypatch.chdir(tmp_path / "cs")  # (given as a relative path: its folder is still named)
    with pytest.raises(FileNotFoundError, match=rf"convert the folder holding it, `python -m data_prep.cityscapes --root {tmp_path}/cs "):
        split_modalities("leftImg8bit", "train")


def test_missing_camera_is_named_and_nothing_is_written(converted, tmp_path):
    src = str(tmp_path / "cs")
    shutil.copytree(converted[0], src)
    gone = f"{src}/camera/train/bochum/bochum_000000_000313_camera.json"
    os.remove(gone)
    with pytest.raises(ValueError, match="bochum_000000_000313_camera.json") as e:
        convert(src, str(tmp_path / "out"), OUT_HW, workers=1)
    assert gone in str(e.value) and "camera_trainvaltest.zip" in str(e.value)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(f"{tmp_path}/out.partial")


def test_interrupted_run_never_looks_complete_and_resumes(converted, tmp_path):
    src, out = str(tmp_path / "cs"), str(tmp_path / "out")
    shutil.copytree(converted[0], src)
    bad = f"{src}/disparity/train/bochum/bochum_000000_000313_disparity.png"
    good = open(bad, "rb").read()
    open(bad, "wb").write(b"not a png")
    with pytest.raises(ValueError, match="bochum_000000_000313_disparity.png: cannot decode PNG"):
        convert(src, out, OUT_HW, workers=1)
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial/index.csv")
    assert os.path.exists(f"{out}.partial/train/rgb/0.jpg")  # aachen, before the bad one: kept for the resume
    open(bad, "wb").write(good)
    summary = convert(src, out, OUT_HW, workers=1)
    assert summary["state"] == "resumed" and summary["kept"] == 1 and summary["converted"] == 3
    for rel in ("train/semseg/1.png", "train/depth/0.png", "val/depth/0.png", "test/rgb/0.jpg", "index.csv"):
        assert open(f"{out}/{rel}", "rb").read() == open(f"{converted[1]}/{rel}", "rb").read(), rel
    assert convert(src, out, OUT_HW, workers=1)["state"] == "up to date"
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(src, out, (8, 16), workers=1)  # another size: another conversion
    assert convert(src, out, (8, 16), workers=1, overwrite=True)["state"] == "converted"
    assert MiniscapesFolder(out, "val")[0]["rgb"].shape[:2] == (8, 16)


def test_a_local_conversion_is_on_the_disk_before_it_takes_its_name(converted, tmp_path, disk_events):
    """``<out>`` appears by one rename of the finished folder: every file in it is synced before
    (a power loss leaves no complete-looking folder with files the disk never got), the folder's
    new name after."""
    out = os.path.realpath(tmp_path / "out")
    convert(converted[0], out, OUT_HW, workers=1)
    disk_events = disk_events()
    renamed = disk_events.index(("rename", out))
    synced = {path for what, path in disk_events[:renamed] if what == "fsync"}
    files = {os.path.relpath(os.path.join(folder, n), out) for folder, _, names in os.walk(out) for n in names}
    assert "index.csv" in files and {f"{out}.partial/{f}" for f in files} <= synced, disk_events
    assert ("fsync", str(tmp_path.resolve())) in disk_events[renamed:]


def test_fsspec_destination_marks_completion_last(converted):
    import fsspec

    src, mem = converted[0], fsspec.filesystem("memory")
    mem.pipe("/foreign/notes.txt", b"x")
    with pytest.raises(FileExistsError, match="not this conversion"):
        convert(src, "memory://foreign", OUT_HW, workers=1)
    assert convert(src, "memory://cs-out", OUT_HW, splits=("train", "val"), workers=1)["state"] == "converted"
    assert mem.exists("/cs-out/index.csv") and len(MiniscapesFolder("memory://cs-out", "train")) == 2
    mem.rm("/cs-out/index.csv")  # as if the run had stopped before its last write
    mem.rm("/cs-out/val/depth/0.png")
    with pytest.raises(ValueError, match="memory://cs-out is an unfinished conversion .*run the conversion command again"):
        MiniscapesFolder("memory://cs-out", "train")  # the project's readers refuse it
    summary = convert(src, "memory://cs-out", OUT_HW, splits=("train", "val"), workers=1)
    assert (summary["state"], summary["converted"], summary["kept"]) == ("resumed", 1, 2)
    assert mem.cat_file("/cs-out/val/depth/0.png") == open(f"{converted[1]}/val/depth/0.png", "rb").read()


def test_out_at_above_or_in_the_source_is_refused_whatever_overwrite_says(tmp_path):
    """--overwrite replaces --out whole (a local one at the end, by its .partial folder; a URL
    at once): an --out that holds the Cityscapes source would delete it."""
    import fsspec

    src = tmp_path / "data" / "cityscapes"
    make_tree(str(src))
    for out in (src, tmp_path / "data", tmp_path):
        with pytest.raises(ValueError, match=f"^{out} holds the input {src}: .*choose another folder"):
            convert(str(src), str(out), OUT_HW, workers=1, overwrite=True)
    partial = tmp_path / "mini.partial" / "cityscapes"
    shutil.copytree(src, partial)
    with pytest.raises(ValueError, match="mini.partial holds the input"):  # (where a local --out is built)
        convert(str(partial), str(tmp_path / "mini"), OUT_HW, workers=1, overwrite=True)
    assert (src / "leftImg8bit").is_dir() and (partial / "leftImg8bit").is_dir()
    mem = fsspec.filesystem("memory")
    for p in src.rglob("*.*"):
        mem.pipe(f"/b/x/cityscapes/{p.relative_to(src)}", p.read_bytes())
    for out in ("memory://b/x/cityscapes/", "memory://b/x", "memory://b"):
        with pytest.raises(ValueError, match=f"^{out} holds the input memory://b/x/cityscapes"):
            convert("memory://b/x/cityscapes", out, OUT_HW, workers=1, overwrite=True)
    assert mem.exists("/b/x/cityscapes/leftImg8bit")
    check_out("memory://b/x/cityscapes", "memory://b/x/cityscapes-mini")  # a sibling (same prefix, not a folder above)
    check_out(str(src), f"{src}-mini")
    check_out("memory://b/x/cityscapes", str(tmp_path / "b"))  # another store
    # a folder of the source (gtFine/) as --out: it would be replaced; a new folder inside deletes nothing
    for out in (f"{src}/gtFine", "memory://b/x/cityscapes/gtFine"):
        with pytest.raises(ValueError, match=f"^{out} is part of the input .*cityscapes: .*choose a folder that is not there"):
            convert(out.rsplit("/", 1)[0], out, OUT_HW, workers=1, overwrite=True)
    assert (src / "gtFine").is_dir() and mem.exists("/b/x/cityscapes/gtFine")
    check_out(str(src), f"{src}/miniscapes")
    convert(str(src), f"{src}/miniscapes", OUT_HW, workers=1)  # (a conversion kept inside the source: it may run again)
    assert convert(str(src), f"{src}/miniscapes", OUT_HW, workers=1)["state"] == "up to date"


def test_splits_named_twice_or_none_are_refused(tmp_path, capsys):
    from data_prep.cityscapes import main

    src = tmp_path / "cs"
    make_tree(str(src))
    for splits, message in ((("val", "val"), "--splits names val more than once"), ((), "--splits names no split")):
        with pytest.raises(ValueError, match=message):
            convert(str(src), str(tmp_path / "out"), OUT_HW, splits=splits, workers=1)
        with pytest.raises(SystemExit) as e:
            main(["--root", str(src), "--out", str(tmp_path / "out"), "--splits", *splits])
        assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_default_workers_are_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """On a 64-CPU machine where a cgroup/taskset gives this job 1 CPU, the conversion runs on
    1 process, not 64."""
    from data_prep import cityscapes

    make_tree(str(tmp_path / "cs"))
    used = []
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(cityscapes, "run_jobs", lambda jobs, workers, *rest: used.append(workers))
    convert(str(tmp_path / "cs"), str(tmp_path / "out"), OUT_HW)
    assert used == [1]


def _worker_killed(job):
    os._exit(9)  # as the kernel's OOM killer ends a worker: no exception, no result


def test_a_killed_conversion_worker_is_one_error_line(tmp_path, monkeypatch, in_process):
    from data_prep import cityscapes

    make_tree(str(tmp_path / "cs"))
    monkeypatch.setattr(cityscapes, "convert_chunk", _worker_killed)
    r = in_process(cityscapes.main, ["--root", str(tmp_path / "cs"), "--out", str(tmp_path / "out"), "--size", "16x32",
                                     "--workers", "2"])
    assert r.returncode == 2 and r.stderr == "error: a conversion worker died (out of memory?): lower --workers (this run had 2)\n"
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_and_a_link_is_followed_before_converting(tmp_path, in_process):
    """A file as --out (or where its .partial goes) is refused before anything is converted
    (no .partial made); a link is followed as the other commands' outputs are: the conversion
    goes into its target, and the link reads it. (Both failed only after the whole conversion.)
    A negative --workers is refused too, not taken as one worker."""
    from data_prep import cityscapes

    src = str(tmp_path / "cs")
    make_tree(src)
    for name in ("out", "mini.partial"):
        (tmp_path / name).write_text("not a folder")
        out = str(tmp_path / name).removesuffix(".partial")
        r = in_process(cityscapes.main, ["--root", src, "--out", out, "--size", "16x32", "--workers", "1"])
        assert r.returncode == 2, r.stderr
        assert r.stderr == f"error: --out {tmp_path / name} is a file, not a folder: give a folder (new, or an earlier conversion)\n"
    assert not (tmp_path / "out.partial").exists() and (tmp_path / "mini.partial").read_text() == "not a folder"
    r = in_process(cityscapes.main, ["--root", src, "--out", str(tmp_path / "x"), "--workers", "-1"])
    assert r.returncode == 2 and "error: --workers must be 0 (one per usable CPU) or more, got -1" in r.stderr
    with pytest.raises(ValueError, match="--workers must be 0"):
        convert(src, str(tmp_path / "x"), OUT_HW, workers=-1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert convert(src, str(tmp_path / "link"), OUT_HW, workers=1)["state"] == "converted"
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target/index.csv").exists()
    assert len(MiniscapesFolder(str(tmp_path / "link"), "train")) == 2
    assert convert(src, str(tmp_path / "link"), OUT_HW, workers=1)["state"] == "up to date"
