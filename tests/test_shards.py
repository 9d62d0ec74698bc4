"""Data prep to WebDataset shards on a real S3 endpoint (moto on loopback) and streaming them back."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import fsspec
import numpy as np
import pytest
import torch

from data_prep.shard import shard_dataset
from mtl.data.folder import MiniscapesFolder
from mtl.data.miniscapes import encode_semseg_png
from mtl.data.shards import ShardLoader, ShardSplit, ShardStream, read_manifest
from mtl.data.transforms import CROP_KEYS, Augment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _decoders_loaded():
    """torchvision's decoders imported here once: the sharding workers forked from this process
    inherit them instead of importing torchvision (seconds) in every pool of every test."""
    from mtl.data.miniscapes import _torchvision_io

    _torchvision_io()


def _shard_cli(*args, env=None, **kw):
    """`python -m data_prep.shard ARGS`: with ``env``, in a process of its own; else its main in
    this process (seconds of imports saved per call), output captured alike."""
    if env is not None:
        return subprocess.run([sys.executable, "-m", "data_prep.shard", *args], cwd=REPO, capture_output=True, text=True, env=env,
                              **kw)
    from conftest import run_main
    from data_prep.shard import main

    return run_main(main, args)


def test_manifest_describes_the_shards(s3_shards, tiny_root):
    m = read_manifest(s3_shards)
    fs = fsspec.filesystem("s3")
    for split, n in (("train", 96), ("val", 24), ("test", 16)):
        s = m["splits"][split]
        assert s["num_samples"] == n and s["image_size"] == [64, 128] and s["skipped"] == []
        assert s["modalities"] == ["rgb", "semseg", "depth"]
        assert [x["name"] for x in s["shards"]] == [f"{split}-{i:06d}.tar" for i in range(-(-n // 8))]
        for x in s["shards"]:
            assert fs.size(f"streetmtl/tiny-shards/{x['name']}") == x["num_bytes"]
    assert m["source"] == tiny_root and m["tool_version"]
    assert not fs.exists("streetmtl/tiny-shards/_progress")
    # original bytes, no re-encoding
    import hashlib
    import tarfile
    with fs.open("streetmtl/tiny-shards/train-000000.tar", "rb") as fh:
        data = fh.read()
    assert hashlib.sha256(data).hexdigest() == m["splits"]["train"]["shards"][0]["sha256"]
    with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
        assert tar.extractfile("3.semseg.png").read() == open(f"{tiny_root}/train/semseg/3.png", "rb").read()


def test_aws_cli_sees_shards_and_manifest(s3_shards):
    r = subprocess.run(["aws", "s3", "ls", s3_shards + "/"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "manifest.json" in r.stdout and "train-000011.tar" in r.stdout and "val-000002.tar" in r.stdout


@pytest.mark.parametrize("nodes, start", [(1, "fork"), (2, "fork"), (3, "fork"), (2, "forkserver")])
def test_every_sample_exactly_once_and_equal_to_the_folder(s3_shards, tiny_root, nodes, start, worker_start):
    """(start: the loader workers forked from this process, or from a fork server as in a Ray
    worker: `mtl.data.loader.worker_start_kwargs`; they read S3 either way.)"""
    worker_start(start)
    split = ShardSplit.from_manifest(read_manifest(s3_shards), "train")
    folder = MiniscapesFolder(tiny_root, "train", Augment(), seed=5)
    seen, batches = [], []
    for rank in range(nodes):
        loader = ShardLoader(ShardStream(split, Augment(), seed=5, rank=rank, world=nodes), 4, 2, 2, False, False)
        loader.set_epoch(3)
        n = 0
        for batch in loader:
            n += 1
            for j, idx in enumerate(batch["index"].tolist()):
                seen.append(idx)
                ref = folder[(3, idx)]  # same (seed, epoch, index) -> same augmentation
                for k in ("rgb", "semseg", "disparity", *CROP_KEYS):
                    assert torch.equal(batch[k][j], ref[k]), (idx, k)
        assert n == len(loader)
        batches.append(n)
    assert sorted(seen) == list(range(96))  # every sample, exactly once, across nodes x 2 workers


def test_training_batches_agree_across_ranks(s3_shards):
    split = ShardSplit.from_manifest(read_manifest(s3_shards), "train")
    lens = [len(ShardLoader(ShardStream(split, None, rank=r, world=3), 4, 2, 2, True, False)) for r in range(3)]
    assert len(set(lens)) == 1 and lens[0] >= 6  # every rank runs the same number of steps: no DDP hang
    got = [sum(1 for _ in ShardLoader(ShardStream(split, None, rank=r, world=3), 4, 2, 2, True, False)) for r in range(3)]
    assert got == lens


def test_validation_takes_more_ranks_than_shards_and_training_does_not(s3_shards):
    """A validation split of fewer shards than ranks (Cityscapes' 500 val images fit one shard):
    the ranks without a shard evaluate nothing and the sums over ranks hold every sample once.
    Training ranks step together, so there every rank needs a shard."""
    manifest = read_manifest(s3_shards)
    val = ShardSplit.from_manifest(manifest, "val")
    world = len(val.urls) + 1
    loaders = [ShardLoader(ShardStream(val, None, shuffle=False, rank=r, world=world, every_rank=False), 4, 1, 2, False, False)
               for r in range(world)]
    seen = [i for loader in loaders for b in loader for i in b["index"].tolist()]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == sum(val.counts) and [len(x) for x in loaders][-1] == 0
    train = ShardSplit.from_manifest(manifest, "train")
    with pytest.raises(ValueError, match=f"{len(train.urls)} shard\\(s\\) cannot feed {len(train.urls) + 1} ranks"):
        ShardStream(train, None, rank=0, world=len(train.urls) + 1)


def test_a_manifest_named_relative_to_the_working_folder_finds_its_shards(tiny_root, tmp_path, monkeypatch):
    shard_dataset(tiny_root, str(tmp_path / "s"), "8", splits=("val",), workers=1)
    monkeypatch.chdir(tmp_path / "s")
    split = ShardSplit.from_manifest(read_manifest("manifest.json"), "val")
    assert sorted(int(x["index"]) for x in ShardStream(split, None, shuffle=False)) == list(range(24))


def test_a_local_shard_set_is_on_the_disk_before_its_manifest_names_it(tiny_root, tmp_path, disk_events):
    """After a power loss neither a shard's progress record (which a re-run trusts) nor the
    manifest names a shard whose bytes did not reach the disk."""
    from data_prep.shard import SHARD_PROGRESS

    dst = os.path.realpath(tmp_path / "s")
    shard_dataset(tiny_root, dst, "8", splits=("val",), workers=1)  # (its worker process is forked: recorded too)
    events = disk_events()
    shards = sorted(os.path.join(dst, n) for n in os.listdir(dst) if n.endswith(".tar"))
    assert len(shards) == 3, events
    for shard in shards:
        record = events.index(("rename", f"{dst}/{SHARD_PROGRESS}/{os.path.basename(shard)}.json"))
        assert ("fsync", shard) in events[:record], (shard, events)
    manifest = events.index(("rename", f"{dst}/manifest.json"))
    synced = {path for what, path in events[:manifest] if what == "fsync"}
    assert set(shards) <= synced and dst in synced, events
    assert any(p.startswith(f"{dst}/manifest.json.tmp-") for p in synced) and ("fsync", dst) in events[manifest:]


def test_a_shard_iterator_starts_its_workers_before_its_first_batch_is_read(s3_shards):
    """The trainer makes iterators ahead of their use (the next epoch's before validation): their
    workers must start then, not when the first batch is asked for. `close` ends the workers of an
    iterator left unfinished (a run's end)."""
    import multiprocessing

    split = ShardSplit.from_manifest(read_manifest(s3_shards), "train")
    loader = ShardLoader(ShardStream(split, None), 4, 2, 2, True, False)
    before = set(multiprocessing.active_children())
    it = iter(loader)
    assert len(set(multiprocessing.active_children()) - before) == 2
    assert sum(b["rgb"].shape[0] for b in it) == 4 * len(loader)
    it = iter(loader)
    next(it)
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2
    loader.close()
    assert not started & set(multiprocessing.active_children())


def test_epochs_reshuffle(s3_shards):
    split = ShardSplit.from_manifest(read_manifest(s3_shards), "train")
    stream = ShardStream(split, None, seed=0)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        orders.append([int(s["index"]) for s in stream])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(96)) and orders[0] != orders[1]


def test_interrupted_prep_leaves_no_manifest_and_rerun_completes(tiny_root, s3_prefix):
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.shard", "--src", tiny_root, "--dst", s3_prefix,
                             "--shard-size", "2", "--workers", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    fs = fsspec.filesystem("s3")
    bucket_path = s3_prefix.removeprefix("s3://")
    deadline = time.time() + 60
    while time.time() < deadline and not fs.exists(f"{bucket_path}/_progress/train-000003.tar.json"):
        fs.invalidate_cache()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    assert fs.exists(f"{bucket_path}/train-000000.tar")  # it did get going
    assert not fs.exists(f"{bucket_path}/manifest.json")
    with pytest.raises(FileNotFoundError, match="no shard manifest at .*interrupted"):
        read_manifest(s3_prefix)
    with pytest.raises(FileNotFoundError, match="train/rgb .it holds a shard set without manifest.json: sharding was interrupted"):
        MiniscapesFolder(s3_prefix, "train")  # (what --data takes it for without a manifest)
    r = _shard_cli("--src", tiny_root, "--dst", s3_prefix, "--shard-size", "2")
    assert r.returncode == 0, r.stderr
    m = read_manifest(s3_prefix)
    assert m["splits"]["train"]["num_samples"] == 96 and len(m["splits"]["train"]["shards"]) == 48
    with pytest.raises(FileNotFoundError, match=r"train/rgb \(it is a shard set: give it with --shards\)$"):
        MiniscapesFolder(s3_prefix, "train")  # (a finished one, given as a Miniscapes folder: --root)


def test_bad_samples_stop_the_run_with_a_list(tiny_root, tmp_path, s3_prefix):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_root, bad)
    os.remove(bad / "val/rgb/3.jpg")
    (bad / "train/semseg/7.png").write_bytes(encode_semseg_png(np.full((64, 128), 77, np.uint8)))
    (bad / "train/depth/9.png").write_bytes((bad / "train/depth/9.png").read_bytes()[:50])  # truncated
    os.remove(bad / "val/rgb/5.jpg")
    os.mkdir(bad / "val/rgb/5.jpg")
    r = _shard_cli("--src", str(bad), "--dst", s3_prefix, "--shard-size", "8")
    assert r.returncode == 2
    assert "val/rgb/3.jpg" in r.stderr and "nothing was published" in r.stderr
    assert not fsspec.filesystem("s3").exists(s3_prefix.removeprefix("s3://") + "/manifest.json")

    os.rename(bad / "val/semseg/3.png", tmp_path / "x.png")
    os.rename(bad / "val/depth/3.png", tmp_path / "y.png")  # val/3 now simply absent
    r = _shard_cli("--src", str(bad), "--dst", s3_prefix, "--shard-size", "8")
    assert r.returncode == 2
    # real paths under --src, as a user can go and look at them
    assert "train/semseg/7.png: labels outside 0..18/255: [77]" in r.stderr and "train/depth/9.png: cannot decode PNG" in r.stderr
    assert "val/rgb/5.jpg: a folder, not a file" in r.stderr and "Traceback" not in r.stderr
    assert not fsspec.filesystem("s3").exists(s3_prefix.removeprefix("s3://") + "/manifest.json")
    os.rmdir(bad / "val/rgb/5.jpg")
    shutil.copy(f"{tiny_root}/val/rgb/5.jpg", bad / "val/rgb/5.jpg")

    r = _shard_cli("--src", str(bad), "--dst", s3_prefix, "--shard-size", "8", "--skip-bad")
    assert r.returncode == 0, r.stderr
    m = read_manifest(s3_prefix)
    assert m["splits"]["train"]["num_samples"] == 94 and m["splits"]["val"]["num_samples"] == 23
    assert sorted(s["key"] for s in m["splits"]["train"]["skipped"]) == ["train/7", "train/9"]
    split = ShardSplit.from_manifest(m, "train")
    assert sorted(int(s["index"]) for s in ShardStream(split, None, shuffle=False)) == [i for i in range(96) if i not in (7, 9)]


def test_bad_flags_and_unreachable_s3(tiny_root, tmp_path):
    r = _shard_cli("--src", tiny_root, "--dst", str(tmp_path / "o"), "--shard-size", "lots")
    assert r.returncode == 2 and "--shard-size must be" in r.stderr
    r = _shard_cli("--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o"))
    assert r.returncode == 2 and "Miniscapes folder missing" in r.stderr
    # on S3 a deletion at sets[12] would match sets1/ and sets2/: refused before anything is read
    r = _shard_cli("--src", tiny_root, "--dst", "s3://streetmtl/sets[12]")
    assert r.returncode == 2 and "--shards 's3://streetmtl/sets[12]': '[', ']' cannot be in the path" in r.stderr, r.stderr
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",  # (keys: run alone too)
           "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    t0 = time.time()
    r = _shard_cli("--src", tiny_root, "--dst", "s3://streetmtl/x", env=env, timeout=120)
    assert r.returncode == 2 and "destination s3://streetmtl/x: cannot reach s3://streetmtl/x" in r.stderr, r.stderr
    assert time.time() - t0 < 90


def test_an_os_error_reading_a_shard_keeps_its_errno_and_is_not_called_corrupt_data():
    """A shard that cannot be read (permissions, I/O) is named with the OS's words, without the
    advice to re-create the set; webdataset hands errors up with the shard's URL appended, through
    the handler twice."""
    from mtl.data.shards import _reraise_with_context

    def handled(exn):
        with pytest.raises(Exception) as e:
            _reraise_with_context(exn)
        return e.value

    first = handled(PermissionError(13, "Permission denied"))
    first.args = (*first.args, object(), "/data/shards/train-000001.tar")  # (webdataset's stream and URL)
    assert str(handled(first)) == "corrupt or unreadable shard /data/shards/train-000001.tar: [Errno 13] Permission denied"
    assert str(handled(OSError(5, "Input/output error", "/data/shards/train-000002.tar"))) == (
        "corrupt or unreadable shard /data/shards/train-000002.tar: [Errno 5] Input/output error")


def test_missing_and_corrupt_shards_are_named(tiny_root, tmp_path):
    dst = tmp_path / "shards"
    shard_dataset(tiny_root, str(dst), "8", splits=("val",), workers=1)
    split = ShardSplit.from_manifest(read_manifest(str(dst)), "val")
    (dst / "val-000001.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError) as e:
        list(ShardStream(split, None, shuffle=False))
    assert str(e.value).startswith(f"corrupt or unreadable shard {dst}/val-000001.tar: ") and str(e.value).count("val-000001") == 1
    assert str(e.value).endswith("(re-create the shard set: python -m data_prep.shard --root ... --shards ... --overwrite)")
    (dst / "val-000001.tar").write_bytes((dst / "val-000000.tar").read_bytes()[:3000])  # (cut short: webdataset's own words)
    with pytest.raises(ValueError, match=rf"^corrupt or unreadable shard {dst}/val-000001.tar: unexpected end of data \(re-create"):
        list(ShardStream(split, None, shuffle=False))
    os.remove(dst / "val-000001.tar")
    with pytest.raises(FileNotFoundError, match="val-000001.tar"):
        list(ShardStream(split, None, shuffle=False))
    with pytest.raises(ValueError, match="split 'train' not in shard manifest"):
        ShardSplit.from_manifest(read_manifest(str(dst)), "train")
    mem = fsspec.filesystem("memory")  # a remote store (read through fsspec): the message names the shard once
    for name in os.listdir(dst):
        mem.pipe(f"/named-shards/{name}", (dst / name).read_bytes())
    remote = ShardSplit.from_manifest(read_manifest("memory://named-shards"), "val")
    with pytest.raises(FileNotFoundError) as missing:
        list(ShardStream(remote, None, shuffle=False))
    assert str(missing.value) == "shard missing: memory://named-shards/val-000001.tar"
    mem.rm("/named-shards", recursive=True)


def test_a_training_split_without_shards_is_named(tiny_root, tmp_path):
    from mtl.config import DataConfig, ExperimentConfig, TrainConfig
    from mtl.data.build import build_loaders

    dst = tmp_path / "shards"
    shard_dataset(tiny_root, str(dst), "8", splits=("train", "val"), workers=1)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []
    (dst / "manifest.json").write_text(json.dumps(manifest))
    cfg = ExperimentConfig(data=DataConfig(shards=str(dst), workers=0), train=TrainConfig(batch_size=4, device="cpu")).validate()
    with pytest.raises(ValueError, match=f"{dst}: the val split has no samples"):
        build_loaders(cfg)


def test_local_training_streams_shards_from_s3(s3_shards, tmp_path):
    r = subprocess.run([sys.executable, "jobs/train.py", "--local", "--encoder", "resnet18", "--shards", s3_shards, "--epochs", "1",
                        "--batch-size", "4", "--max-steps-per-epoch", "3", "--out", str(tmp_path), "--name", "s3"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "96 train / 24 val samples from s3://streetmtl/tiny-shards" in r.stdout
    metrics = json.loads((tmp_path / "s3/metrics/epoch-0001.json").read_text())
    assert metrics["num_depth_images"] == 24  # the whole val split was evaluated


def test_a_split_without_labels_shards_and_streams_back(tiny_root, tmp_path):
    """A real Miniscapes test split has rgb/ only: it shards to <index>.rgb.jpg members, the
    manifest says so, and the stream yields rgb + index; labelled splits are unchanged."""
    import tarfile

    src = tmp_path / "src"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    (src / "test").mkdir()
    shutil.copytree(f"{tiny_root}/test/rgb", src / "test" / "rgb")
    dst = tmp_path / "shards"
    m = shard_dataset(str(src), str(dst), "5", splits=("val", "test"), workers=1)
    assert m["splits"]["test"]["modalities"] == ["rgb"] and m["splits"]["val"]["modalities"] == ["rgb", "semseg", "depth"]
    assert m["splits"]["test"]["num_samples"] == 16 and m["splits"]["test"]["image_size"] == [64, 128]
    with tarfile.open(dst / "test-000000.tar") as tar:
        assert tar.getnames() == [f"{i}.rgb.jpg" for i in range(5)]
    m = read_manifest(str(dst))
    test = ShardSplit.from_manifest(m, "test")
    assert not test.has_labels and ShardSplit.from_manifest(m, "val").has_labels
    folder = MiniscapesFolder(str(src), "test")
    samples = list(ShardStream(test, None, shuffle=False))
    assert sorted(int(x["index"]) for x in samples) == list(range(16))
    for x in samples:
        assert sorted(x) == ["index", "rgb"] and torch.equal(x["rgb"], folder[int(x["index"])]["rgb"])
    with pytest.raises(ValueError, match="no labels.*cannot be augmented"):
        ShardStream(test, Augment())
    # re-sharding over it (asked for) writes the same bytes: the same manifest entries
    again = shard_dataset(str(src), str(dst), "5", splits=("val", "test"), workers=1, overwrite=True)
    assert again["splits"]["test"]["shards"] == m["splits"]["test"]["shards"]
    # a manifest from before the key existed: all three modalities
    del m["splits"]["val"]["modalities"]
    assert ShardSplit.from_manifest(m, "val").modalities == ("rgb", "semseg", "depth")


def test_a_complete_shard_set_is_replaced_only_when_asked_and_only_the_splits_named(tiny_root, tmp_path):
    """A re-run into a published set is refused (the old manifest and shards stay usable, also
    when the new run would have failed on its source); --overwrite --splits val re-shards val
    and keeps train's shards and manifest entry."""
    dst = tmp_path / "shards"
    first = shard_dataset(tiny_root, str(dst), "24", splits=("train", "val"), workers=1)
    before = {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()}
    r = _shard_cli("--src", str(tmp_path / "typo"), "--dst", str(dst))
    assert r.returncode == 2 and "Miniscapes folder missing" in r.stderr
    r = _shard_cli("--src", tiny_root, "--dst", str(dst), "--shard-size", "8")
    assert r.returncode == 2 and "holds a complete shard set (train, val): pass --overwrite" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()} == before  # nothing touched
    r = _shard_cli("--src", tiny_root, "--dst", str(dst), "--shard-size", "8", "--splits", "val", "--overwrite")
    assert r.returncode == 0, r.stderr
    m = read_manifest(str(dst))
    assert m["splits"]["train"] == first["splits"]["train"] and [len(m["splits"][s]["shards"]) for s in ("train", "val")] == [4, 3]
    assert sorted(p.name for p in dst.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(4)] + [f"val-{i:06d}.tar" for i in range(3)]
    assert sorted(int(x["index"]) for x in ShardStream(ShardSplit.from_manifest(m, "train"), None, shuffle=False)) == list(range(96))
    (dst / "manifest.json").write_text('{"format": ')  # not a manifest (written by hand, torn): replaced only when asked
    for text in ('{"format": ', "[]"):
        (dst / "manifest.json").write_text(text)
        with pytest.raises(FileExistsError, match="manifest.json is not a manifest .not a JSON object.: pass --overwrite"):
            shard_dataset(tiny_root, str(dst), "24", splits=("val",), workers=1)
    shard_dataset(tiny_root, str(dst), "24", splits=("val",), workers=1, overwrite=True)
    assert list(read_manifest(str(dst))["splits"]) == ["val"]  # (what the unreadable one listed is not known: not kept)
    empty = tmp_path / "empty"
    for mod in ("rgb", "semseg", "depth"):
        (empty / "val" / mod).mkdir(parents=True)
    with pytest.raises(ValueError, match="empty/val: no samples to shard"):
        shard_dataset(str(empty), str(tmp_path / "e"), "8", splits=("val",), workers=1)


def test_an_interrupted_run_reuses_a_shard_only_while_its_source_files_are_unchanged(tiny_root, tmp_path):
    import tarfile

    src, dst = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    (src / "val/depth/20.png").write_bytes(b"not a png")  # the run fails in its last shard; the others have records
    with pytest.raises(ValueError, match="val/depth/20.png: cannot decode PNG"):
        shard_dataset(str(src), str(dst), "6", splits=("val",), workers=1)  # shards of samples 0-5, 6-11, 12-17, 18-23
    assert not (dst / "manifest.json").exists() and (dst / "_progress/val-000002.tar.json").exists()
    written = {n: (dst / f"val-00000{n}.tar").stat().st_mtime_ns for n in range(3)}
    shutil.copy(f"{tiny_root}/val/depth/20.png", src / "val/depth/20.png")
    new_rgb = (src / "val/rgb/1.jpg").read_bytes()[:-2] + b"\x00\x00\xff\xd9"  # sample 1 changed (another size): shard 0
    (src / "val/rgb/1.jpg").write_bytes(new_rgb)
    old = (src / "val/rgb/9.jpg").read_bytes()  # sample 9 edited in place, its size kept: shard 1
    same_size = old[:-3] + bytes([old[-3] ^ 1]) + old[-2:]
    (src / "val/rgb/9.jpg").write_bytes(same_size)
    os.utime(src / "val/rgb/9.jpg", (time.time() + 5, time.time() + 5))  # (a later modification time on any clock)
    shard_dataset(str(src), str(dst), "6", splits=("val",), workers=1)
    with tarfile.open(dst / "val-000000.tar") as tar:
        assert tar.extractfile("1.rgb.jpg").read() == new_rgb  # shard 0 was written again, from the changed source
    with tarfile.open(dst / "val-000001.tar") as tar:
        assert tar.extractfile("9.rgb.jpg").read() == same_size  # and shard 1, whose file kept its size
    assert (dst / "val-000002.tar").stat().st_mtime_ns == written[2]  # shard 2, unchanged, was kept


def test_a_shard_that_no_longer_matches_its_manifest_is_named(tiny_root, tmp_path):
    """A shard replaced after its manifest was written (a stale copy, a re-shard under a running
    job) with fewer samples: the reader says so instead of ending a rank's epoch early."""
    import tarfile

    dst = tmp_path / "shards"
    shard_dataset(tiny_root, str(dst), "8", splits=("val",), workers=1)
    with tarfile.open(dst / "val-000001.tar") as tar:
        keep = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.startswith("15.")]
    with tarfile.open(dst / "val-000001.tar", "w") as tar:
        for member, data in keep:
            tar.addfile(member, io.BytesIO(data))
    split = ShardSplit.from_manifest(read_manifest(str(dst)), "val")
    with pytest.raises(ValueError, match="val-000001.tar holds 7 samples, its manifest says 8"):
        list(ShardStream(split, None, shuffle=False))
    loader = ShardLoader(ShardStream(split, None, shuffle=False), 4, 2, 2, drop_last=False, pin_memory=False)
    with pytest.raises(ValueError, match="val-000001.tar holds 7 samples"):  # also from a loader worker
        list(loader)


def test_corrupt_jpeg_in_a_shard_is_named_by_url_and_member(s3_prefix):
    """The shard URL and the tar member, not a made-up path: `aws s3 cp` and `tar x` find it."""
    import io
    import tarfile

    from mtl.data.miniscapes import encode_depth_png, encode_rgb_jpeg

    buf = io.BytesIO()
    good = encode_rgb_jpeg(np.zeros((8, 16, 3), np.uint8))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        members = (("41.rgb.jpg", good), ("42.rgb.jpg", good[:40]),  # 42: truncated
                   ("42.semseg.png", encode_semseg_png(np.zeros((8, 16), np.uint8))), ("42.depth.png", encode_depth_png(np.full((8, 16), 10.0))))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = f"{s3_prefix}/train-000003.tar"
    with fsspec.open(url, "wb") as fh:
        fh.write(buf.getvalue())
    split = ShardSplit((url,), (2,), ("rgb",))
    with pytest.raises(ValueError, match=rf"^{url}:42.rgb.jpg: cannot decode RGB JPEG"):
        list(ShardStream(split, None, shuffle=False))
    with pytest.raises(ValueError, match=rf"^shard sample {url}:41 lacks \['41.semseg.png', '41.depth.png'\]"):
        list(ShardStream(ShardSplit((url,), (2,)), None, shuffle=False))


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_failed_overwrite_leaves_the_published_set_readable_and_resumes(tiny_root, tmp_path):
    """--overwrite --splits train over a published set, with a sample whose labels are bad (a
    value of 40, found only while its shard is written) and one whose sizes disagree: the run
    fails naming both (each key once), and the old set is as it was, every split readable. The
    new shards were staged: once the samples are fixed, the re-run moves the ones written into
    place instead of writing them again."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    for split in ("train", "val"):
        shutil.copytree(f"{tiny_root}/{split}", src / split)
    shard_dataset(str(src), str(dst), "24", splits=("train", "val"), workers=1)
    before = _files(dst)
    good = {n: (src / f"train/semseg/{n}.png").read_bytes() for n in (3, 7)}
    (src / "train/semseg/7.png").write_bytes(encode_semseg_png(np.full((64, 128), 40, np.uint8)))
    (src / "train/semseg/3.png").write_bytes(encode_semseg_png(np.zeros((32, 64), np.uint8)))
    r = _shard_cli("--src", str(src), "--dst", str(dst), "--shard-size", "8", "--splits", "train", "--overwrite")
    assert r.returncode == 2 and (f"2 bad sample(s); nothing was published (the shard set there is as it was, and the shards "
                                  f"written wait in {dst}/_progress/ for the same command's rerun)") in r.stderr, r.stderr
    assert "train/7: train/semseg/7.png: labels outside 0..18/255: [40]" in r.stderr
    assert "train/3: image sizes (HxW) disagree: train/rgb/3.jpg 64x128, train/semseg/3.png 32x64" in r.stderr
    assert "train/3: train/3" not in r.stderr
    assert _files(dst) == before  # the manifest and every shard, byte for byte
    m = read_manifest(str(dst))
    for split, n in (("train", 96), ("val", 24)):
        assert sorted(int(x["index"]) for x in ShardStream(ShardSplit.from_manifest(m, split), None, shuffle=False)) == list(range(n))
    staged = (dst / "_progress/train-000005.tar").stat().st_mtime_ns  # (samples 40-47: written, staged)
    for n, data in good.items():
        (src / f"train/semseg/{n}.png").write_bytes(data)
    m = shard_dataset(str(src), str(dst), "8", splits=("train",), workers=1, overwrite=True)
    assert len(m["splits"]["train"]["shards"]) == 12 and read_manifest(str(dst))["splits"] == m["splits"]
    assert (dst / "train-000005.tar").stat().st_mtime_ns == staged and not (dst / "_progress").exists()
    train = ShardSplit.from_manifest(read_manifest(str(dst)), "train")
    assert sorted(int(x["index"]) for x in ShardStream(train, None, shuffle=False)) == list(range(96))


def test_a_run_stopped_while_it_puts_its_shards_in_place_says_so_and_is_finished_by_the_next(tiny_root, tmp_path, monkeypatch):
    """Once every new shard is written the old manifest goes and the shards move into place: a
    failure then (here the disk fails the second move) says that no set is published and what
    to do. A next run that leaves train out is refused, naming it (publishing val alone would
    leave train's shards unlisted); with train it finishes: the moved and the staged shards
    are kept, val's entry is kept as it was, and the old train shards the new plan does not
    name are deleted."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    for split in ("train", "val"):
        shutil.copytree(f"{tiny_root}/{split}", src / split)
    first = shard_dataset(str(src), str(dst), "8", splits=("train", "val"), workers=1)  # 12 train shards
    replace, moves = os.replace, []

    def failing(a, b, *args, **kw):
        if "/_progress/" in str(a) and str(a).endswith(".tar"):
            moves.append(b)
            if len(moves) == 2:
                raise OSError(5, "Input/output error")
        return replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match=f"{dst}: putting the new shards in place failed .*Input/output error.*, the old "
                                      f"manifest.json removed: no shard set is published there now; run the same command again"):
        shard_dataset(str(src), str(dst), "24", splits=("train",), workers=1, overwrite=True)  # 4 train shards
    monkeypatch.setattr(os, "replace", replace)
    assert not (dst / "manifest.json").exists()
    left = _files(dst)
    with pytest.raises(ValueError, match=f"{dst} holds shards of the train split.s. that an interrupted run began and no "
                                         f"manifest lists: add train to --splits"):
        shard_dataset(str(src), str(dst), "24", splits=("val",), workers=1)
    assert _files(dst) == left
    os.rename(dst / "val-000000.tar", tmp_path / "val-000000.tar")  # a kept split's shard gone meanwhile: named, not published
    with pytest.raises(FileNotFoundError, match="the val split, kept from .* lost or changed shard.s. val-000000.tar: add val to --splits"):
        shard_dataset(str(src), str(dst), "24", splits=("train",), workers=1)
    os.rename(tmp_path / "val-000000.tar", dst / "val-000000.tar")
    moved = (dst / "train-000000.tar").stat().st_mtime_ns
    moves.clear()  # the run that finishes the moves fails too: it says the same
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="no shard set is published there now; run the same command again to finish"):
        shard_dataset(str(src), str(dst), "24", splits=("train",), workers=1)
    monkeypatch.setattr(os, "replace", replace)
    m = shard_dataset(str(src), str(dst), "24", splits=("train",), workers=1)
    assert m["splits"]["val"] == first["splits"]["val"] and read_manifest(str(dst))["splits"] == m["splits"]
    assert (dst / "train-000000.tar").stat().st_mtime_ns == moved  # (moved before the failure: kept)
    assert sorted(p.name for p in dst.glob("train-*")) == [f"train-{i:06d}.tar" for i in range(4)]
    assert not (dst / "_progress").exists()
    for split, n in (("train", 96), ("val", 24)):
        stream = ShardStream(ShardSplit.from_manifest(read_manifest(str(dst)), split), None, shuffle=False)
        assert sorted(int(x["index"]) for x in stream) == list(range(n))


def test_a_split_an_interrupted_run_began_is_not_left_unlisted(tiny_root, tmp_path):
    """A first run of val and test fails on a bad val sample after writing test's shards: a run
    of val alone is refused, naming test; val and test together finish it."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    for split in ("val", "test"):
        shutil.copytree(f"{tiny_root}/{split}", src / split)
    good = (src / "val/depth/20.png").read_bytes()
    (src / "val/depth/20.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="val/depth/20.png: cannot decode PNG"):
        shard_dataset(str(src), str(dst), "8", splits=("val", "test"), workers=1)
    (src / "val/depth/20.png").write_bytes(good)
    with pytest.raises(ValueError, match="holds shards of the test split.s. that an interrupted run began .*add test to --splits"):
        shard_dataset(str(src), str(dst), "8", splits=("val",), workers=1)
    m = shard_dataset(str(src), str(dst), "8", splits=("val", "test"), workers=1)
    assert [m["splits"][s]["num_samples"] for s in ("val", "test")] == [24, 16] and not (dst / "_progress").exists()

    # a published val set, to which a run failing on a bad sample tried to add test: it only staged test's
    # shards (the published set was never touched), so nothing of test is left to list: a run of val goes on
    shutil.rmtree(dst)
    shard_dataset(str(src), str(dst), "8", splits=("val",), workers=1)
    (src / "test/rgb/0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="test/rgb/0.jpg: cannot decode"):
        shard_dataset(str(src), str(dst), "8", splits=("test",), workers=1, overwrite=True)
    m = shard_dataset(str(src), str(dst), "8", splits=("val",), workers=1, overwrite=True)
    assert list(m["splits"]) == ["val"] and not (dst / "_progress").exists()


def test_shard_named_files_no_run_wrote_are_replaced_only_when_asked(tiny_root, tmp_path):
    """Another pipeline's val-000000.tar where this run would write its first shard: refused,
    naming it, before anything is written; --overwrite replaces it."""
    dst = tmp_path / "shards"
    dst.mkdir()
    (dst / "val-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match=f"{dst} holds val-000000.tar, named as this run's shards, which no manifest or "
                                              f"progress record of this tool lists .*: pass --overwrite"):
        shard_dataset(tiny_root, str(dst), "8", splits=("val",), workers=1)
    assert _files(dst) == {"val-000000.tar": b"someone else's"} and not (dst / "_progress").exists()
    r = _shard_cli("--src", tiny_root, "--dst", str(dst), "--shard-size", "8", "--splits", "val")
    assert r.returncode == 2 and "holds val-000000.tar, named as this run's shards" in r.stderr
    m = shard_dataset(tiny_root, str(dst), "8", splits=("val",), workers=1, overwrite=True)
    assert m["splits"]["val"]["num_samples"] == 24 and (dst / "val-000000.tar").read_bytes() != b"someone else's"


def test_a_miniscapes_folder_is_refused_as_the_destination(tiny_root, tmp_path):
    """Shards written into a Miniscapes folder would make it two data sets in one: refused,
    naming it, with nothing written there (its <split>/rgb/, or a conversion's conversion.json)."""
    other = tmp_path / "other"
    shutil.copytree(f"{tiny_root}/test", other / "test")
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "conversion.json").write_text("{}")
    for dst, mark in ((other, "test/rgb/"), (converted, "conversion.json")):
        before = sorted(p.name for p in dst.iterdir())
        with pytest.raises(ValueError, match=f"--shards {dst} is a Miniscapes folder .it holds {mark}.: .*e.g. {dst}-shards"):
            shard_dataset(tiny_root, str(dst), "8", splits=("val",), workers=1, overwrite=True)
        assert sorted(p.name for p in dst.iterdir()) == before


def test_a_split_whose_samples_all_lack_a_file_names_them(tiny_root, tmp_path):
    """Every sample without its depth file: the missing files are named, as the folder reader
    names them. Empty semseg/ and depth/ beside rgb/: the hint that a split without labels has
    rgb/ only."""
    src = tmp_path / "src"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    for p in (src / "val/depth").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"src/val: no samples to shard: every sample lacks a file: val/depth/0.png, "
                                         r"val/depth/1.png, .* \.\.\. \(24 in all\)$"):
        shard_dataset(str(src), str(tmp_path / "s"), "8", splits=("val",), workers=1)
    for p in (src / "val/semseg").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"every sample lacks a file: val/semseg/0.png, val/depth/0.png, .*\(48 in all\) "
                                         r"\(val/semseg/ and depth/ hold no sample's file: a split without labels has rgb/ only"):
        shard_dataset(str(src), str(tmp_path / "s"), "8", splits=("val",), workers=1)
    assert not (tmp_path / "s").exists()


def test_a_negative_workers_count_is_refused(tiny_root, tmp_path, in_process):
    """(It was taken as one worker, silently.) The sharder's and the synthesizer's flag."""
    from data_prep import shard, synthesize

    commands = ((shard.main, ["--root", tiny_root, "--shards", str(tmp_path / "s")]), (synthesize.main, ["--out", str(tmp_path / "x")]))
    for main, args in commands:
        r = in_process(main, [*args, "--workers", "-2"])
        assert r.returncode == 2 and "error: --workers must be 0 (one per usable CPU) or more, got -2" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="--workers must be 0"):
        shard_dataset(tiny_root, str(tmp_path / "s"), "8", splits=("val",), workers=-1)
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_an_unreadable_progress_record_counts_as_none(tiny_root, tmp_path):
    """A record cut short (empty) or not a record: its shard is written again instead of every
    resume failing on a JSON error that names no file."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    (src / "val/depth/20.png").write_bytes(b"not a png")  # the run fails in its last shard; the others have records
    with pytest.raises(ValueError, match="val/depth/20.png: cannot decode PNG"):
        shard_dataset(str(src), str(dst), "6", splits=("val",), workers=1)
    (dst / "_progress/val-000000.tar.json").write_bytes(b"")
    (dst / "_progress/val-000001.tar.json").write_text("[]")
    shutil.copy(f"{tiny_root}/val/depth/20.png", src / "val/depth/20.png")
    m = shard_dataset(str(src), str(dst), "6", splits=("val",), workers=1)
    assert m["splits"]["val"]["num_samples"] == 24
    split = ShardSplit.from_manifest(read_manifest(str(dst)), "val")
    assert sorted(int(x["index"]) for x in ShardStream(split, None, shuffle=False)) == list(range(24))


def test_the_first_failed_shard_stops_the_run(tiny_root, tmp_path, monkeypatch):
    """An I/O error in one shard ends the run at once: the shards not yet begun are not written,
    also when the collecting thread sees the error late (a busy machine: here it sleeps before
    each look), since only 2 per worker are handed out ahead."""
    import data_prep.pool

    wait = data_prep.pool.wait

    def late(*a, **k):
        time.sleep(0.3)
        return wait(*a, **k)

    monkeypatch.setattr(data_prep.pool, "wait", late)
    dst = tmp_path / "shards"
    (dst / "train-000000.tar").mkdir(parents=True)  # the first shard cannot be written
    with pytest.raises(IsADirectoryError, match="train-000000.tar"):
        shard_dataset(tiny_root, str(dst), "1", splits=("train",), workers=2)  # 96 shards
    written = [p for p in dst.glob("train-*.tar") if p.is_file()]
    assert len(written) <= 2 * 2 * 2, len(written)  # (the first window and, at most, the one after it)


def test_two_files_of_one_sample_index_are_refused(tiny_root, tmp_path):
    """01.jpg beside 1.jpg are both sample 1: refused as the folder reader refuses them, before
    anything is written, instead of streaming sample 1 twice."""
    src = tmp_path / "src"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        shutil.copy(src / f"val/{mod}/1.{ext}", src / f"val/{mod}/01.{ext}")
    with pytest.raises(ValueError) as folder_error:
        MiniscapesFolder(str(src), "val")
    with pytest.raises(ValueError, match="val/rgb/01.jpg and .*val/rgb/1.jpg are both sample 1: rename one") as e:
        shard_dataset(str(src), str(tmp_path / "s"), "8", splits=("val",), workers=1)
    assert str(e.value) == str(folder_error.value) and not (tmp_path / "s").exists()


def test_splits_named_twice_or_none_are_refused(tiny_root, tmp_path, capsys):
    from data_prep.shard import main

    for splits, message in ((("val", "val"), "--splits names val more than once"), ((), "--splits names no split")):
        with pytest.raises(ValueError, match=message):
            shard_dataset(tiny_root, str(tmp_path / "s"), "8", splits=splits, workers=1)
        with pytest.raises(SystemExit) as e:
            main(["--root", tiny_root, "--shards", str(tmp_path / "s"), "--splits", *splits])
        assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_auto_shard_size_gives_a_split_about_256_shards_and_resumes(tiny_root, tmp_path, monkeypatch):
    """auto: about 256 shards of equal sample counts (within one), each of at least 32, cut early
    at 256 MB; 1000 and 256MB keep their meaning. An interrupted auto run plans the same shards
    again and keeps them."""
    from data_prep import shard
    from data_prep.shard import parse_shard_size, plan_shards

    def plan(n: int, size: str = "auto", file_bytes: int = 1000) -> list[int]:
        return [len(s) for s in plan_shards([(str(i), {"rgb": file_bytes}) for i in range(n)], *parse_shard_size(size))]

    assert plan(100) == [34, 33, 33] and plan(40) == [40] and plan(2975) == [33] * 31 + [32] * 61  # (Cityscapes train)
    assert plan(20000) == [80] * 13 + [79] * 240 and plan(5, file_bytes=100 << 20) == [2, 2, 1]
    assert plan(2500, "1000") == [1000, 1000, 500] and plan(5, "256MB", file_bytes=100 << 20) == [2, 2, 1]
    assert shard.ShardCommand("a", "b").shard_size == "auto"
    monkeypatch.setattr(shard, "AUTO_MIN_SAMPLES", 4)
    monkeypatch.setattr(shard, "AUTO_SHARDS", 4)  # val's 24 samples: 4 shards of 6
    src, dst = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    (src / "val/depth/20.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="val/depth/20.png"):
        shard_dataset(str(src), str(dst), splits=("val",), workers=1)
    written = {n: (dst / f"val-00000{n}.tar").stat().st_mtime_ns for n in range(3)}
    shutil.copy(f"{tiny_root}/val/depth/20.png", src / "val/depth/20.png")
    m = shard_dataset(str(src), str(dst), splits=("val",), workers=1)
    assert m["shard_size"] == "auto" and [s["num_samples"] for s in m["splits"]["val"]["shards"]] == [6, 6, 6, 6]
    assert {n: (dst / f"val-00000{n}.tar").stat().st_mtime_ns for n in range(3)} == written  # kept, not rewritten


def test_the_trainer_is_told_what_an_epoch_leaves_out_and_which_loader_workers_idle():
    """Each loader worker batches the samples of its own shards: three shards of 100 for four
    workers of batch 4 leave one worker without a shard; three of 10 would leave out 6 samples
    with four workers (2 batches from each 10), so training runs two (20 and 10: 7 batches)."""
    from mtl.data.build import Loaders, coverage_notes

    split = ShardSplit(("a.tar", "b.tar", "c.tar"), (100, 100, 100))
    loader = ShardLoader(ShardStream(split, None), 4, 4, 2, True, False)
    assert (len(loader), loader.workers, loader.idle_workers()) == (75, 4, 1)
    assert coverage_notes(Loaders(loader, loader, 300, 300, "shards", 4), len(loader), 4) == [
        "1 of this rank's 4 loader workers get no shard and stay idle: --workers 3 leaves none idle, or reshard into more shards "
        "(data_prep.shard --shard-size 75: a shard for each loader worker of 1 rank(s); auto makes shards of at least 32 samples)"]
    loader = ShardLoader(ShardStream(ShardSplit(split.urls, (10, 10, 10)), None), 4, 4, 2, True, False)
    assert (len(loader), loader.workers, loader.idle_workers()) == (7, 2, 0)
    notes = coverage_notes(Loaders(loader, loader, 30, 30, "shards", 4), len(loader), 4)
    assert notes == ["an epoch trains on 28 of the 30 train samples (93 %): each loader worker batches the samples of its "
                     "own shards and the ranks stop together at the smallest one's batch count; the order changes every "
                     "epoch, and with it the samples left out",
                     "training reads the shards with 2 of this rank's 4 loader workers: each worker batches only its own "
                     "shards and drops what does not fill a batch, and with about 30 samples per rank more workers would "
                     "leave out more of them"]
    evaluation = ShardLoader(ShardStream(ShardSplit(split.urls, (10, 10, 10)), None), 4, 4, 2, False, False)
    assert (len(evaluation), evaluation.workers) == (9, 4)  # (every sample, in partial batches too)
    assert not any("an epoch" in n for n in coverage_notes(Loaders(loader, loader, 28, 28, "shards", 4), 7, 4))  # all used


def test_few_samples_per_rank_still_make_an_epoch():
    """Cityscapes' 2975 training images in shards of 32 (93: 92 of 32, one of 31) over 8
    ranks of 12 loader workers at batch 64: one shard per worker would make no batch at all."""
    split = ShardSplit(tuple(f"s{i}.tar" for i in range(93)), (32,) * 92 + (31,))
    assert min(split.batches_per_rank(8, 12, 64)) == 0
    loaders = [ShardLoader(ShardStream(split, None, rank=r, world=8), 64, 12, 2, True, False) for r in range(8)]
    assert {len(x) for x in loaders} == {5} and {x.workers for x in loaders} == {6}  # 5 = 2975 // 8 // 64: none lost
    assert ShardLoader(ShardStream(split, None), 16, 12, 2, True, False).workers == 12  # one rank: all 12 are worth it


def test_sharding_deletes_only_the_shards_it_wrote(tiny_root, tmp_path):
    """Someone keeps a backup beside the shards (and a shard-named copy from elsewhere): sharding
    into that folder, and re-sharding it into fewer shards, deletes the shards this tool wrote
    that the new manifest no longer lists (also those an earlier --overwrite run that failed
    staged, and a shard a killed worker left half-written), and nothing else."""
    src, dst = tmp_path / "src", tmp_path / "shards"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    dst.mkdir()
    (dst / "val-2023-backup.tar").write_bytes(b"precious")
    (dst / "val-000009.tar").write_bytes(b"copied from another set")  # named like a shard; no run of ours wrote it
    first = shard_dataset(str(src), str(dst), "8", splits=("val",), workers=1)
    assert [s["name"] for s in first["splits"]["val"]["shards"]] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    good = (src / "val/depth/20.png").read_bytes()
    (src / "val/depth/20.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="val/depth/20.png"):  # one shard now; the run fails, the old set stays
        shard_dataset(str(src), str(dst), "24", splits=("val",), workers=1, overwrite=True)
    (src / "val/depth/20.png").write_bytes(good)
    from mtl.data.miniscapes import SHARD_PROGRESS

    (dst / "val-000005.tar").write_bytes(b"half a shard")  # a worker killed while writing it: its record says so
    (dst / SHARD_PROGRESS / "val-000005.tar.pending").write_bytes(b"")
    shard_dataset(str(src), str(dst), "24", splits=("val",), workers=1, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.json", "val-000000.tar", "val-000009.tar", "val-2023-backup.tar"]
    assert (dst / "val-2023-backup.tar").read_bytes() == b"precious"


def test_a_shard_manifest_path_given_as_the_destination_is_refused(tiny_root, tmp_path):
    """Training takes --shards .../manifest.json; pasted into the sharder it would have made a
    folder named manifest.json. It is refused, pointing at the folder meant."""
    r = _shard_cli("--src", tiny_root, "--dst", str(tmp_path / "s" / "manifest.json"), "--splits", "val")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--shards {tmp_path}/s/manifest.json names a .json file" in r.stderr and r.stderr.rstrip().endswith(f"e.g. {tmp_path}/s")
    assert not (tmp_path / "s").exists()


def test_a_file_name_with_a_dot_is_refused_before_it_is_sharded(tiny_root, tmp_path):
    """val/rgb/1.5.jpg would shard fine and then fail in training (WebDataset keys a sample by
    the name up to its first dot): refused when planning, naming the file."""
    src = tmp_path / "src"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        os.rename(src / f"val/{mod}/5.{ext}", src / f"val/{mod}/1.5.{ext}")
    with pytest.raises(ValueError, match=r"src/val/rgb/1.5.jpg: a file name with a dot .*rename it"):
        shard_dataset(str(src), str(tmp_path / "s"), "8", splits=("val",), workers=1)
    assert not (tmp_path / "s").exists()


def test_a_miniscapes_folder_given_as_shards_is_named_so(tiny_root):
    with pytest.raises(FileNotFoundError, match=rf"no shard manifest at {tiny_root}/manifest.json .*; {tiny_root} is a "
                                                rf"Miniscapes folder: read it with --root$"):
        read_manifest(tiny_root)


def test_a_long_file_name_is_sharded_and_read_back(tiny_root, tmp_path):
    """A stem past tar's old 100-byte member name (a converted set's long names): shards are
    POSIX (pax) tar, which holds it, and the reader finds the sample under it."""
    import tarfile

    src, stem = tmp_path / "src", "frankfurt_000001_000538_leftImg8bit_" * 3 + "x"
    shutil.copytree(f"{tiny_root}/val", src / "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        os.rename(src / f"val/{mod}/5.{ext}", src / f"val/{mod}/{stem}.{ext}")
    shard_dataset(str(src), str(tmp_path / "s"), "64", splits=("val",), workers=1)
    with tarfile.open(tmp_path / "s/val-000000.tar") as tar:
        assert f"{stem}.semseg.png" in tar.getnames()
    split = ShardSplit.from_manifest(read_manifest(str(tmp_path / "s")), "val")
    samples = list(ShardStream(split, None, shuffle=False))
    assert len(samples) == split.counts[0] == len(os.listdir(src / "val/rgb"))


def test_default_workers_are_the_cpus_this_process_may_use(tiny_root, tmp_path, monkeypatch):
    """On a 64-CPU machine where a cgroup/taskset gives this job 1 CPU, sharding starts 1 worker,
    not 64 (each holding its shard's samples in memory)."""
    from data_prep import shard

    started = []

    def pool(workers):
        started.append(workers)
        return ProcessPoolExecutor(workers)

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(shard, "worker_pool", pool)
    shard_dataset(tiny_root, str(tmp_path / "s"), "8", splits=("val",))  # 3 shards
    assert started == [1]


def _worker_killed(job):
    os._exit(9)  # as the kernel's OOM killer ends a worker: no exception, no result


def test_a_killed_sharding_worker_is_one_error_line(tiny_root, tmp_path, monkeypatch):
    from data_prep import shard

    monkeypatch.setattr(shard, "write_shard", _worker_killed)
    r = _shard_cli("--src", tiny_root, "--dst", str(tmp_path / "s"), "--splits", "val", "--shard-size", "8", "--workers", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == "error: a sharding worker died (out of memory?): lower --workers (this run had 2)\n"
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("workers", [1, 3])
def test_a_loader_knows_its_epoch_at_another_number_of_ranks(workers):
    """The LR plan's unit is an epoch of the planned ranks (`mtl.engine.Trainer`): an elastic run
    started with fewer ranks plans with the shard loader's own count at the planned number (each
    loader worker drops what fills no batch of its own), not with samples over ranks."""
    split = ShardSplit(("a.tar", "b.tar", "c.tar", "d.tar", "e.tar"), (8, 8, 8, 8, 5))
    two = ShardLoader(ShardStream(split, None, rank=0, world=2), 4, workers, 2, True, False)
    for world in (1, 2, 3):
        there = ShardLoader(ShardStream(split, None, rank=0, world=world), 4, workers, 2, True, False)
        assert two.len_at(world) == len(there)
    assert two.len_at(3) < 37 // 3 // 4  # (the samples-over-ranks count would plan more)
