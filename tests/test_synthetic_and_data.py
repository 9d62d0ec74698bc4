"""Synthetic generator, folder dataset and joint augmentation, as a user meets them."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep.synthesize import synthesize
from mtl.data.folder import MiniscapesFolder, list_split
from mtl.data.miniscapes import IGNORE_INDEX, NUM_CLASSES, decode_depth, decode_semseg
from mtl.data.transforms import Augment, augment, sample_rng, to_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_the_exact_layout(tmp_path):
    out = tmp_path / "ms"
    r = subprocess.run([sys.executable, "-m", "data_prep.synthesize", "--out", str(out), "--train", "5", "--val", "2",
                        "--test", "2", "--size", "32x64"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for split, n in (("train", 5), ("val", 2), ("test", 2)):
        for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
            assert sorted(os.listdir(out / split / mod)) == sorted(f"{i}.{ext}" for i in range(n))
    from PIL import Image
    assert Image.open(out / "train/rgb/0.jpg").format == "JPEG"
    assert Image.open(out / "train/semseg/0.png").mode in ("P", "L")
    assert Image.open(out / "train/depth/0.png").mode == "L"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary folder left behind


def test_cli_refuses_to_clobber_and_bad_size(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "data_prep.synthesize", "--out", str(tmp_path / "x"), "--train", "1"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert (tmp_path / "x" / "keep").read_text() == "mine"
    r = subprocess.run([sys.executable, "-m", "data_prep.synthesize", "--out", str(tmp_path / "y"), "--size", "big"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "HxW" in r.stderr


def test_deterministic_given_seed(tmp_path):
    a = synthesize(str(tmp_path / "a"), {"train": 3}, (32, 64), seed=7, workers=1)
    b = synthesize(str(tmp_path / "b"), {"train": 3}, (32, 64), seed=7, workers=2)
    c = synthesize(str(tmp_path / "c"), {"train": 3}, (32, 64), seed=8, workers=1)
    read = lambda root: open(os.path.join(root, "train/depth/2.png"), "rb").read()  # noqa: E731
    assert read(a) == read(b) != read(c)


def test_scenes_are_plausible(tiny_root):
    """Sky on top with invalid depth, road at the bottom, depth growing toward the horizon,
    cars closer than the road behind them, and some ignore pixels."""
    sky_top, road_bottom, ignore, car_ok = [], [], 0, []
    for i in range(20):
        lab = decode_semseg(open(f"{tiny_root}/train/semseg/{i}.png", "rb").read())
        dep, valid = decode_depth(open(f"{tiny_root}/train/depth/{i}.png", "rb").read())
        assert lab.max() < NUM_CLASSES or IGNORE_INDEX in lab
        sky_top.append(np.mean(lab[0] == 10) + np.mean(lab[0] == 2) + np.mean(lab[0] == 8))
        road_bottom.append(np.mean(lab[-8] == 0))
        ignore += int((lab == IGNORE_INDEX).sum())
        assert not valid[lab == 10].any()  # sky has no depth
        road = (lab == 0) & valid
        rows = np.nonzero(road.any(1))[0]
        med = [np.median(dep[r][road[r]]) for r in rows]
        assert np.all(np.diff(med) <= 1e-3)  # road depth shrinks toward the bottom
        cars = (lab == 13) & valid
        if cars.any():
            car_ok.append(np.median(dep[cars]) < 80)
    assert np.mean(sky_top) > 0.9 and np.mean(road_bottom) > 0.4 and ignore > 0 and all(car_ok)


def test_folder_dataset_decodes_all_three(tiny_root):
    ds = MiniscapesFolder(tiny_root, "val")
    assert len(ds) == 24
    s = ds[3]
    assert s["rgb"].shape == (3, 64, 128) and s["rgb"].dtype == torch.float32
    assert s["semseg"].dtype == torch.int64 and s["depth"].dtype == torch.float32 and s["valid"].dtype == torch.bool
    lab = decode_semseg(open(f"{tiny_root}/val/semseg/3.png", "rb").read())
    assert torch.equal(s["semseg"], torch.from_numpy(lab).long())
    assert (s["depth"][s["valid"]] >= 4 - 1e-3).all() and (s["depth"][~s["valid"]] == 0).all()
    assert int(s["index"]) == 3


def test_missing_folder_and_file_are_named(tiny_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="Miniscapes folder missing: .*/nowhere/train/rgb"):
        list_split(str(tmp_path / "nowhere"), "train")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root, broken)
    os.remove(broken / "train/depth/5.png")
    with pytest.raises(FileNotFoundError, match=r"train/depth/5.png"):
        MiniscapesFolder(str(broken), "train")


def test_bad_labels_are_named(tiny_root, tmp_path):
    from mtl.data.miniscapes import encode_semseg_png
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root, broken)
    (broken / "val/semseg/2.png").write_bytes(encode_semseg_png(np.full((64, 128), 40, np.uint8)))
    with pytest.raises(ValueError, match=r"val/2/semseg.png: labels outside 0..18/255: \[40\]"):
        MiniscapesFolder(str(broken), "val")[2]


def test_augmentation_is_joint_and_consistent():
    """A synthetic sample whose label equals a function of its rgb and depth: after augmentation the
    relation must still hold pixel by pixel."""
    h, w = 40, 60
    labels = np.tile((np.arange(w) // 6 % 19).astype(np.uint8), (h, 1))
    depth = (labels.astype(np.float32) + 5.0)
    valid = np.ones((h, w), bool)
    labels[:5] = IGNORE_INDEX
    valid[:5] = False
    depth[:5] = 0
    rgb = np.repeat((labels.astype(np.uint8) * 10)[..., None], 3, axis=2)
    t = {"rgb": rgb, "semseg": labels, "depth": depth, "valid": valid}
    aug = Augment(1.0, 1.25, (32, 48), True)
    for i in range(20):
        a = to_tensors(augment(t, aug, sample_rng(0, 0, i)))
        assert a["semseg"].shape == (32, 48) and a["rgb"].shape == (3, 32, 48)
        lab, dep, val = a["semseg"], a["depth"], a["valid"]
        ok = lab != IGNORE_INDEX
        assert torch.equal(dep[ok], lab[ok].float() + 5.0)  # nearest resampling keeps depth tied to labels
        assert torch.equal(val, ok)  # ignore and invalid stay together
        assert (dep[~val] == 0).all()
    # reproducible from (seed, epoch, index)
    assert np.array_equal(augment(t, aug, sample_rng(0, 3, 9))["rgb"], augment(t, aug, sample_rng(0, 3, 9))["rgb"])


def test_crop_larger_than_image_pads_with_ignore():
    t = {"rgb": np.zeros((10, 10, 3), np.uint8), "semseg": np.zeros((10, 10), np.uint8),
         "depth": np.full((10, 10), 7.0, np.float32), "valid": np.ones((10, 10), bool)}
    a = to_tensors(augment(t, Augment(1.0, 1.0, (16, 16), False), sample_rng(0, 0, 0)))
    assert a["semseg"].shape == (16, 16)
    assert (a["semseg"] == IGNORE_INDEX).sum() == 16 * 16 - 100 and (~a["valid"]).sum() == 16 * 16 - 100


def test_bad_augment_settings():
    with pytest.raises(ValueError, match="scale range"):
        Augment(1.5, 1.0)
