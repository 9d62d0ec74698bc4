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
from mtl.data.batch import to_model_batch
from mtl.data.transforms import Augment, augment, sample_rng

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


@pytest.mark.parametrize("args, said", [
    (["--out", "", "--overwrite"], "--out '' names no folder (an unset variable?)"),  # ($OUT unset: it replaced the folder)
    (["--out", ".", "--overwrite"], "holds the folder this command runs in"),
    (["--out", "y", "--train", "0", "--val", "0", "--test", "0"], "nothing to write: --train, --val, --test are all 0"),
    (["--out", "y", "--train", "-1"], "--train must be at least 0, got -1"),
    (["--out", "y", "--seed", "-1"], "--seed must be at least 0, got -1"),
])
def test_the_synthesizer_refuses_what_would_replace_the_folder_it_runs_in_or_write_nothing(tmp_path, in_process, monkeypatch,
                                                                                          args, said):
    from data_prep import synthesize

    (tmp_path / "precious").write_text("mine")
    monkeypatch.chdir(tmp_path)
    r = in_process(synthesize.main, [*args, "--size", "32x32", "--workers", "1"])
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert os.listdir(tmp_path) == ["precious"]


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
    assert s["rgb"].shape == (64, 128, 3) and s["rgb"].dtype == torch.uint8  # compact: converted on the device
    lab = decode_semseg(open(f"{tiny_root}/val/semseg/3.png", "rb").read())
    depth_m, valid = decode_depth(open(f"{tiny_root}/val/depth/3.png", "rb").read())
    assert torch.equal(s["semseg"], torch.from_numpy(lab))
    assert int(s["index"]) == 3
    b = to_model_batch({k: v[None] for k, v in s.items()}, torch.device("cpu"))
    assert b["rgb"].shape == (1, 3, 64, 128) and b["rgb"].is_contiguous(memory_format=torch.channels_last)
    assert b["semseg"].dtype == torch.int64 and torch.equal(b["semseg"][0], torch.from_numpy(lab).long())
    assert torch.equal(b["valid"][0], torch.from_numpy(valid))
    assert torch.allclose(b["depth"][0], torch.from_numpy(depth_m), rtol=1e-5)
    assert (b["depth"][0][~b["valid"][0]] == 0).all() and (b["depth"][b["valid"]] >= 4 - 1e-3).all()
    mean_colour = b["rgb"][0].mean((1, 2))
    assert mean_colour.abs().max() < 3  # ImageNet-normalised


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
    with pytest.raises(ValueError, match=rf"^{broken}/val/semseg/2.png: labels outside 0..18/255: \[40\]"):
        MiniscapesFolder(str(broken), "val")[2]


def test_corrupt_jpeg_is_reported_with_its_real_path(tiny_root, tmp_path):
    """The message names the file as it is on disk (<root>/train/rgb/5.jpg), also when the
    error comes back from a loader worker process (the CLIs print `one_line` of it)."""
    from torch.utils.data import DataLoader

    from mtl.errors import one_line

    broken = tmp_path / "broken"
    shutil.copytree(tiny_root, broken)
    (broken / "train/rgb/5.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match=rf"^{broken}/train/rgb/5.jpg: cannot decode RGB JPEG"):
        MiniscapesFolder(str(broken), "train")[5]
    loader = DataLoader(MiniscapesFolder(str(broken), "train"), batch_size=4, num_workers=1)
    with pytest.raises(Exception) as info:
        list(loader)
    assert one_line(info.value).startswith(f"{broken}/train/rgb/5.jpg: cannot decode RGB JPEG")


def _rgb_only_split(tiny_root, tmp_path, split="test", n=6):
    root = tmp_path / "rgb-only"
    (root / split / "rgb").mkdir(parents=True)
    for i in range(n):
        shutil.copy(f"{tiny_root}/test/rgb/{i}.jpg", root / split / "rgb" / f"{i}.jpg")
    return root


def test_a_split_without_labels_reads_rgb_only(tiny_root, tmp_path):
    root = _rgb_only_split(tiny_root, tmp_path)
    assert list_split(str(root), "test") == [str(i) for i in range(6)]
    ds = MiniscapesFolder(str(root), "test")
    assert not ds.has_labels and MiniscapesFolder(tiny_root, "test").has_labels and len(ds) == 6
    s = ds[4]
    assert sorted(s) == ["index", "rgb"] and int(s["index"]) == 4
    assert torch.equal(s["rgb"], MiniscapesFolder(tiny_root, "test")[4]["rgb"])
    raw = {k: torch.stack([ds[i][k] for i in range(3)]) for k in s}
    b = to_model_batch(raw, torch.device("cpu"))
    assert sorted(b) == ["index", "rgb"] and b["rgb"].shape == (3, 3, 64, 128) and b["index"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no labels.*cannot be augmented"):
        MiniscapesFolder(str(root), "test", Augment())


def test_half_a_label_set_is_an_error_naming_the_missing_folder(tiny_root, tmp_path):
    root = _rgb_only_split(tiny_root, tmp_path)
    shutil.copytree(f"{tiny_root}/test/semseg", root / "test" / "semseg")
    with pytest.raises(FileNotFoundError, match=rf"Miniscapes folder missing: {root}/test/depth \({root}/test/semseg is there"):
        MiniscapesFolder(str(root), "test")
    shutil.rmtree(root / "test" / "semseg")
    shutil.copytree(f"{tiny_root}/test/depth", root / "test" / "depth")
    with pytest.raises(FileNotFoundError, match=rf"Miniscapes folder missing: {root}/test/semseg"):
        list_split(str(root), "test")


def test_training_on_a_split_without_labels_is_refused_by_name(tiny_root, tmp_path):
    from mtl.config import DataConfig, ExperimentConfig
    from mtl.data.build import build_loaders

    root = _rgb_only_split(tiny_root, tmp_path, split="train")
    os.symlink(f"{tiny_root}/val", root / "val")
    with pytest.raises(ValueError, match=rf"cannot train on {root}/train: it has no labels"):
        build_loaders(ExperimentConfig(data=DataConfig(root=str(root), workers=0, augment=False)))


def test_augmentation_is_joint_and_consistent():
    """A synthetic sample whose label, disparity code and colour are one function of the column:
    after augmentation the relation must still hold pixel by pixel."""
    h, w = 40, 60
    labels = np.tile((np.arange(w) // 6 % 19).astype(np.uint8), (h, 1))
    codes = labels + 10
    labels[:5] = IGNORE_INDEX
    codes[:5] = 0
    rgb = np.repeat((labels * 10)[..., None], 3, axis=2).astype(np.uint8)
    s = {"rgb": rgb, "semseg": labels, "disparity": codes}
    aug = Augment(1.0, 1.25, (32, 48), True)
    flips = 0
    for i in range(20):
        a = augment(s, aug, sample_rng(0, 0, i))
        assert a["semseg"].shape == a["disparity"].shape == (32, 48) and a["rgb"].shape == (32, 48, 3)
        ok = a["semseg"] != IGNORE_INDEX
        assert np.array_equal(a["disparity"][ok], a["semseg"][ok] + 10)  # one index map for both
        assert np.array_equal(a["disparity"] > 0, ok)  # ignore and invalid stay together
        flips += int(a["semseg"][-1, 0] > a["semseg"][-1, -1])
    assert 0 < flips < 20
    # the same (seed, epoch, index) gives the same sample
    assert np.array_equal(augment(s, aug, sample_rng(0, 3, 9))["rgb"], augment(s, aug, sample_rng(0, 3, 9))["rgb"])


def test_zoom_matches_resize_then_crop():
    """Resampling straight into the crop window equals zooming the whole image, then cropping."""
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    s = {"rgb": rgb, "semseg": np.zeros((40, 60), np.uint8), "disparity": np.ones((40, 60), np.uint8)}
    a = augment(s, Augment(1.25, 1.25, (40, 60), False), sample_rng(0, 0, 1))
    full = np.asarray(Image.fromarray(rgb).resize((75, 50), Image.BILINEAR)).astype(int)
    best = min(np.abs(full[y:y + 40, x:x + 60] - a["rgb"]).max() for y in range(11) for x in range(16))
    assert best <= 2


def test_crop_larger_than_image_pads_with_ignore():
    s = {"rgb": np.zeros((10, 10, 3), np.uint8), "semseg": np.zeros((10, 10), np.uint8), "disparity": np.full((10, 10), 7, np.uint8)}
    a = augment(s, Augment(1.0, 1.0, (16, 16), False), sample_rng(0, 0, 0))
    assert a["semseg"].shape == (16, 16)
    assert (a["semseg"] == IGNORE_INDEX).sum() == 16 * 16 - 100 and (a["disparity"] == 0).sum() == 16 * 16 - 100
    b = to_model_batch({k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in a.items()}, torch.device("cpu"))
    assert b["rgb"][0, :, 12, 12].abs().max() < 0.02  # padded with the mean colour


def test_a_crop_larger_than_the_zoomed_images_is_refused_and_one_some_zooms_pad_is_said():
    """As the report chose them (zoom 1.0-1.25, crop 288 of 256-high images), some crops are
    padded; a crop that even the largest zoom does not fill (given as WxH, say) is a mistake."""
    from mtl.config import DataConfig
    from mtl.data.build import crop_note

    assert crop_note(DataConfig(crop=(256, 512)), (256, 512)) is None
    assert crop_note(DataConfig(crop=(288, 288)), (256, 512)) == (
        "--crop 288x288 of 256x512 images: an image zoomed by less than 1.12 (the zoom is drawn from 1-1.25) leaves part of "
        "its crop padded with ignored pixels")
    with pytest.raises(ValueError, match=r"--crop 512x256 is larger than the 256x512 images zoomed by at most --scale-max 1.25 "
                                         r"\(320x640\): every crop would be padded"):
        crop_note(DataConfig(crop=(512, 256)), (256, 512))
    assert crop_note(DataConfig(crop=(512, 256), augment=False), (256, 512)) is None  # (refused by check_new: no crop then)
    assert crop_note(DataConfig(crop=(512, 256)), None) is None  # images of varying sizes: not known ahead


def test_training_batches_are_augmented_on_the_device_like_single_samples(tiny_root):
    """The loader ships untouched samples + crop vectors; `to_model_batch` resamples the batch.
    Each sample of the batch equals that sample augmented alone (labels and depth exactly)."""
    folder = MiniscapesFolder(tiny_root, "train", Augment(0.9, 1.3, (48, 96), True), seed=2)
    plain = MiniscapesFolder(tiny_root, "train")
    items = [folder[(1, i)] for i in range(6)]
    raw = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    assert raw["rgb"].shape == (6, 64, 128, 3) and raw["aug_rows"].shape == (6, 48)  # nothing resampled yet
    b = to_model_batch(raw, torch.device("cpu"))
    assert b["rgb"].shape == (6, 3, 48, 96) and b["rgb"].is_contiguous(memory_format=torch.channels_last)
    for i in range(6):
        s = {k: v.numpy() for k, v in plain[i].items() if k != "index"}
        alone = augment(s, folder.augment, sample_rng(2, 1, i))
        one = to_model_batch({k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in alone.items()}, torch.device("cpu"))
        assert torch.equal(b["semseg"][i], one["semseg"][0]) and torch.equal(b["depth"][i], one["depth"][0])
        assert (b["rgb"][i] - one["rgb"][0]).abs().max() < 0.03  # alone, rgb was rounded to uint8 once more


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_a_loader_batch_crosses_from_its_workers_as_one_shared_buffer(tiny_root, worker_start, start):
    """What a training loader's workers hand over: one shared-memory buffer per batch (one
    descriptor to fetch, one block to pin, one copy to the device), read like the dict torch's
    own collate gives, with the same values, and the same model batch. Workers forked from this
    process or, where Ray is loaded in it, from a fork server: the same batches."""
    from torch.utils.data import default_collate

    from mtl.data.loader import make_loader
    from mtl.data.packed import PackedBatch, pack_collate

    worker_start(start)
    folder = MiniscapesFolder(tiny_root, "train", Augment(0.9, 1.3, (48, 96), True), seed=2)
    loader = make_loader(folder, 4, True, 2, 2, 2)
    assert (loader.multiprocessing_context.get_start_method() if loader.multiprocessing_context else "fork") == start
    loader.sampler.set_epoch(1)
    batches = list(loader)
    order = list(loader.sampler)
    assert len(batches) == len(folder) // 4 and all(isinstance(b, PackedBatch) for b in batches)
    for j, packed in enumerate(batches):
        assert packed.buf.is_shared() and packed.buf.dim() == 1  # made in a worker's shared memory, in one piece
        ref = default_collate([folder[item] for item in order[4 * j : 4 * j + 4]])
        assert sorted(packed) == sorted(ref) and "aug_rows" in packed and "depth" not in packed
        for k, v in packed.items():
            assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
        got, want = to_model_batch(packed, torch.device("cpu")), to_model_batch(ref, torch.device("cpu"))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(TypeError, match="'stem' is a str, not a tensor"):
        pack_collate([{"rgb": torch.zeros(2, 2), "stem": "0001"}])


def test_bad_augment_settings():
    with pytest.raises(ValueError, match="scale range"):
        Augment(1.5, 1.0)


def test_loader_workers_follow_the_cpus_reserved_for_training(tiny_root):
    from mtl.config import DataConfig, ExperimentConfig
    from mtl.data.build import auto_workers, build_loaders

    assert auto_workers(on_gpu=True, cpus=12) == 11 and auto_workers(on_gpu=True, cpus=32) == 12  # capped
    assert auto_workers(on_gpu=True, cpus=4) == 3 and auto_workers(on_gpu=True, cpus=1) == 1
    assert auto_workers(on_gpu=False, cpus=16) == 2 and auto_workers(on_gpu=False, cpus=1) == 0
    auto = build_loaders(ExperimentConfig(data=DataConfig(root=tiny_root)), pin_memory=True, cpus=3)
    assert auto.workers == 2 and auto.train.loader.num_workers == 2
    fixed = build_loaders(ExperimentConfig(data=DataConfig(root=tiny_root, workers=0)), pin_memory=True, cpus=3)
    assert fixed.workers == 0


def test_samples_of_different_sizes_in_one_batch_are_named():
    from mtl.data.packed import pack_collate

    small, large = ({"rgb": torch.zeros(h, 8, 3, dtype=torch.uint8), "index": torch.tensor(i)} for h, i in ((4, 3), (6, 9)))
    with pytest.raises(ValueError, match=r"differ in 'rgb': sample 3 is \[4, 8, 3\], sample 9 is \[6, 8, 3\]"):
        pack_collate([small, small, large])


def test_two_files_that_would_be_one_sample_are_refused_and_named_stems_keep_their_names(tiny_root, tmp_path):
    """A sample's number comes from its stem (`sample_index`): ``01`` and ``1`` would be the same
    sample (and overwrite each other's predictions), so the split is refused naming both; a
    stem that is not a number keeps its name for exports."""
    from mtl.data.miniscapes import sample_index

    root = tmp_path / "m"
    shutil.copytree(f"{tiny_root}/val", root / "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        os.rename(root / f"val/{mod}/2.{ext}", root / f"val/{mod}/zurich_a.{ext}")
    split = MiniscapesFolder(str(root), "val")
    assert split.stems[sample_index("zurich_a")] == "zurich_a" and split.stems[5] == "5"
    assert int(split[split.indices.index("zurich_a")]["index"]) == sample_index("zurich_a")  # as a shard key would be
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        shutil.copy(root / f"val/{mod}/1.{ext}", root / f"val/{mod}/01.{ext}")
    with pytest.raises(ValueError, match=r"val/rgb/01.jpg and .*val/rgb/1.jpg are both sample 1: rename one"):
        MiniscapesFolder(str(root), "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):  # a number past int64: named like a word
        os.rename(root / f"val/{mod}/01.{ext}", root / f"val/{mod}/{'9' * 20}.{ext}")
    split = MiniscapesFolder(str(root), "val")
    assert int(split[split.indices.index("9" * 20)]["index"]) == sample_index("9" * 20) < 2**31


def test_a_macs_dot_files_beside_the_samples_are_not_samples(tiny_root, tmp_path):
    """A set copied from a Mac holds ._0.jpg beside 0.jpg (its resource forks): not samples."""
    root = tmp_path / "copied"
    shutil.copytree(f"{tiny_root}/val", root / "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        (root / f"val/{mod}/._3.{ext}").write_bytes(b"\x00\x05\x16\x07")  # (AppleDouble's magic)
    assert list_split(str(root), "val") == list_split(tiny_root, "val")


def test_an_output_folder_is_local_and_never_replaces_one_another_writer_finished(tmp_path):
    from mtl.atomic import atomic_dir, output_dir

    with pytest.raises(ValueError, match="s3://b/preds: this output is written to a local folder"):
        output_dir("s3://b/preds")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        output_dir(str(tmp_path / "f"))
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="written by another process while this one ran"):
        with atomic_dir(str(out)) as tmp:
            (tmp_path / "mine").write_text(tmp)
            out.mkdir()
            (out / "theirs").write_text("complete")  # another writer (a rank generating the same cache) finished first
    assert os.listdir(out) == ["theirs"] and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # --overwrite: the old output moves aside for the new one, and goes when the new one is in place;
    # if the new one cannot take its place, the old one goes back, unless another writer's did
    real_rename = os.rename

    def failing(other: bool):
        def rename(src, dst):
            if ".tmp-" in str(src):
                if not other:
                    raise PermissionError(f"cannot rename {src}")
                os.makedirs(dst)
                with open(os.path.join(dst, "other"), "w") as fh:
                    fh.write("complete")
            return real_rename(src, dst)
        return rename

    for other, left in ((False, ["theirs"]), (True, ["other"])):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "rename", failing(other))
            with pytest.raises(OSError), atomic_dir(str(out), overwrite=True) as tmp:
                open(os.path.join(tmp, "new"), "w").close()
        assert os.listdir(out) == left and sorted(os.listdir(tmp_path)) == ["f", "mine", "out"]  # nothing left aside
    # another writer finishes between the check and the rename (which then fails with ENOTEMPTY):
    # the same FileExistsError, which a rank generating the synthetic cache takes as "use theirs"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "rename", failing(True))
        with pytest.raises(FileExistsError, match="written by another process while this one ran"):
            with atomic_dir(str(tmp_path / "race")) as tmp:
                open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(tmp_path / "race") == ["other"]
    shutil.rmtree(tmp_path / "race")
    with atomic_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"] and sorted(os.listdir(tmp_path)) == ["f", "mine", "out"]


def test_an_output_folder_reached_through_a_link_is_replaced_where_the_link_points(tmp_path):
    """out -> /elsewhere/preds: --overwrite replaces the folder the link names (the link stays),
    not the link, which would leave the old output there and the new one on the link's disk."""
    from mtl.atomic import atomic_dir

    target, link = tmp_path / "disk2" / "preds", tmp_path / "out"
    target.mkdir(parents=True)
    (target / "old").write_text("x")
    link.symlink_to(target)
    with atomic_dir(str(link), overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert link.is_symlink() and os.listdir(link) == ["new"] and os.listdir(target) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["disk2", "out"] and os.listdir(tmp_path / "disk2") == ["preds"]


KILLED_WRITER = """
import os, signal, sys
from mtl.atomic import atomic_dir
out, when, rename = sys.argv[1], sys.argv[2], os.rename

def killed_between(src, dst):  # the output moved aside, the new one not yet in its place
    rename(src, dst)
    if ".old-" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = killed_between if when == "between renames" else rename
with atomic_dir(out, overwrite=True) as tmp:
    open(os.path.join(tmp, "new"), "w").close()
    if when == "filling":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_a_killed_writer_left_beside_its_output_is_cleaned_up_by_the_next(tmp_path, capsys, monkeypatch):
    """SIGKILL (the OOM killer) skips atomic_dir's clean-up: the next writer of that output on
    this machine deletes the folder the dead one was filling, and puts the output it had moved
    aside back in place when the kill came between its two renames. A live writer's folders
    and another machine's stay."""
    import signal

    import mtl.machine
    from mtl.atomic import atomic_dir, output_dir
    from mtl.machine import machine_token

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("whole")

    def kill_a_writer(when: str) -> None:
        r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), when], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == -signal.SIGKILL, r.stderr

    def aside(kind: str) -> list[str]:
        return [p for p in os.listdir(tmp_path) if p.startswith(f"out.{kind}-")]

    kill_a_writer("filling")
    assert len(aside("tmp")) == 1 and (out / "old").exists()
    kill_a_writer("between renames")  # (it cleans up the first one's folder as it starts)
    assert not out.exists() and len(aside("old")) == 1 and len(aside("tmp")) == 1, os.listdir(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live, foreign = f"out.tmp-{os.getpid()}-{machine_token()}-0123abcd", f"out.tmp-{dead.pid}-{'0' * 8}-0123abcd"
    (tmp_path / live).mkdir()
    (tmp_path / foreign).mkdir()
    capsys.readouterr()
    with pytest.raises(FileExistsError, match="exists and is not empty"), atomic_dir(str(out)):
        pass  # (the output before is back: not replaced without --overwrite)
    assert os.listdir(out) == ["old"] and sorted(os.listdir(tmp_path)) == sorted(["out", live, foreign])
    said = capsys.readouterr().err
    assert "put back the output that a killed writer" in said and "deleted, left by a killed writer" in said, said
    # a writer killed while it deleted the output it had replaced (its new one in place, no folder of
    # its own left) leaves part of the old one: deleted, never put back, also where the output is gone
    shutil.rmtree(out)
    half = tmp_path / f"out.old-{dead.pid}-{machine_token()}-0123abcd"
    (half / "part").mkdir(parents=True)
    assert output_dir(str(out)) == str(out)  # (the commands' early check cleans up: it sees what the write will)
    assert not half.exists() and not out.exists()
    # where this machine cannot be told from another one of its name (no /proc), nothing is touched
    monkeypatch.setattr(mtl.machine, "machine_id", lambda: "?/?")
    half = tmp_path / f"out.old-{dead.pid}-{machine_token()}-0123abcd"  # (named as such a machine names it)
    half.mkdir()
    output_dir(str(out))
    assert half.exists()


def test_the_synthetic_cache_is_reused_only_by_the_same_generator(tmp_path, monkeypatch):
    from mtl.data import build

    monkeypatch.setenv("STREETMTL_CACHE", str(tmp_path))
    first = build.synthetic_root((16, 32), (2, 1, 1), seed=3)
    mtime = os.path.getmtime(first)
    assert build.synthetic_root((16, 32), (2, 1, 1), seed=3) == first and os.path.getmtime(first) == mtime  # reused
    monkeypatch.setattr(build, "GENERATOR_VERSION", build.GENERATOR_VERSION + 1)  # the scenes changed: not reused
    again = build.synthetic_root((16, 32), (2, 1, 1), seed=3)
    assert again != first and sorted(os.listdir(again)) == ["test", "train", "val"]


_FORK_SERVER_WORKERS = """
import os, sys, time
from torch.utils.data import DataLoader
from mtl.data import loader
from mtl.data.folder import MiniscapesFolder
loader.from_fork_server = lambda: True  # as in a process where Ray is loaded
os.environ.pop("STREETMTL_PROBE", None)
list(DataLoader(["STREETMTL_PROBE"], batch_size=None, collate_fn=os.getenv, num_workers=1, **loader.worker_start_kwargs(1)))
os.environ["STREETMTL_PROBE"] = "set after the fork server started"
print(list(DataLoader(["STREETMTL_PROBE"], batch_size=None, collate_fn=os.getenv, num_workers=1, **loader.worker_start_kwargs(1))))
it = iter(loader.make_loader(MiniscapesFolder(sys.argv[1], "train"), 4, True, 0, 2, 2))
next(it)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
time.sleep(300)
"""


def _proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def _gone(pid: int) -> bool:
    try:
        return _proc_stat(pid)[0] == "Z"  # a zombie nobody reaps (PID 1 of a container) is gone too
    except FileNotFoundError:
        return True


def test_fork_server_workers_see_the_trainers_environment_and_end_with_it(tiny_root):
    """Loader workers started from a fork server (`mtl.data.loader.worker_start_kwargs`) see the
    training process's environment as the loader was made, not the server's, and exit when the
    training process is killed (Ray kills a worker group's processes on every restart), as
    forked workers do: torch's own watchdog watches the worker's parent, the server."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-c", _FORK_SERVER_WORKERS, tiny_root], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "['set after the fork server started']"
        workers = [int(x) for x in p.stdout.readline().split()]
        server = int(_proc_stat(workers[0])[1])  # the workers' parent
        assert len(workers) == 2 and server != p.pid
    finally:
        p.kill()
        p.wait()
    deadline = time.time() + 20
    while not all(_gone(pid) for pid in (*workers, server)) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in (*workers, server) if not _gone(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left after the training process was killed: {left}"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_stream_that_cannot_reach_s3_names_the_endpoint_not_a_corrupt_shard(unreachable_s3, workers):
    """botocore's connection errors are not OSErrors: they reached webdataset's handler as a
    "corrupt or unreadable shard". From a loader worker too, the error is one line naming the
    shard's URL and the endpoint."""
    from mtl.data.shards import ShardLoader, ShardSplit, ShardStream
    from mtl.errors import one_line
    from mtl.storage import StorageError

    split = ShardSplit(("s3://streetmtl/shards/train-000000.tar",), (4,))
    loader = ShardLoader(ShardStream(split, None, shuffle=False), 2, workers, 2, False, False)
    with pytest.raises(StorageError) as e:
        next(iter(loader))
    assert one_line(e.value).startswith(f"cannot reach s3://streetmtl/shards/train-000000.tar at endpoint {unreachable_s3}: "
                                        f"Could not connect to the endpoint URL")


def test_data_prep_workers_end_with_their_killed_parent(tmp_path):
    """A data-prep tool killed (SIGKILL: nothing of it runs any more) takes its pool's workers with
    it (`mtl.machine.worker_pool`): they would otherwise write on beside a rerun."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "data_prep.synthesize", "--out", str(tmp_path / "d"), "--train", "4000", "--val", "0",
                          "--test", "0", "--size", "64x128", "--workers", "2"], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for task in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{task}/children") as fh:
                found += [int(c) for c in fh.read().split()]
        return found

    deadline = time.monotonic() + 120
    while len(workers := children()) < 2:
        assert time.monotonic() < deadline and p.poll() is None, "the pool's workers did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # (they write)
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{w}") and "zombie" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their killed parent"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((line for line in fh if line.startswith("State:")), "").lower()
    except OSError:
        return "zombie"  # (gone meanwhile)


def test_data_prep_pools_work_under_every_start_method():
    """`mtl.machine.worker_pool` ties a worker to its parent only where the pool's process is the
    parent: a fork server's workers are the server's children, and must not end at their start."""
    code = ("import multiprocessing as mp, sys; mp.set_start_method(sys.argv[1])\n"
            "from mtl.machine import worker_pool\n"
            "if __name__ == '__main__':\n"
            "    with worker_pool(2) as pool: print(sorted(pool.map(abs, [-3, -1, 2])))\n")
    for method in ("fork", "forkserver", "spawn"):
        r = subprocess.run([sys.executable, "-c", code, method], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "[1, 2, 3]", (method, r.stderr[-2000:])
