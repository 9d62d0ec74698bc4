"""Evaluation and prediction as a user meets them: jobs/evaluate.py on the checkpoint's own data
(folder or shards) and on --data, export of a test split without labels, and jobs/predict.py /
mtl.predict on arbitrary images."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import evaluate as evaluate_cli
from jobs import predict as predict_cli
from mtl.checkpoint import Checkpointer, FolderStorage, TrainState, epoch_tag
from mtl.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig
from mtl.data.build import DataSource, resolve_source
from mtl.data.miniscapes import decode_depth, decode_semseg, disparity_png_to_metres, metres_to_disparity_png
from mtl.data.batch import normalize_rgb
from mtl.engine import predict
from mtl.losses import DepthCodec
from mtl.models import build_model
from mtl.predict import load_model, predict_images, predict_to_folder
from mtl.strategy import PlainStrategy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ModelConfig(arch="deeplabv3p", encoder="resnet18", output_stride=32)  # the cheapest model: CPU tests stay fast


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    from mtl.models import build_model

    return build_model(MODEL).state_dict()


@pytest.fixture
def make_run(weights, tmp_path):
    """A run folder holding one checkpoint as the trainer writes it (config, model, epoch,
    ``input_size`` unless None), for the given data config."""

    def make(data: DataConfig, input_size=(64, 128), name="run", tasks=("semseg", "depth"), metrics=None, epoch_step=0) -> str:
        cfg = ExperimentConfig(data=data, model=MODEL, optim=OptimConfig(tasks=tasks))
        model = build_model(MODEL)
        model.load_state_dict(weights)
        run = str(tmp_path / name)
        state = TrainState(epoch=1, input_size=list(input_size) if input_size is not None else None, epoch_step=epoch_step)
        strategy = PlainStrategy(model, torch.optim.SGD(model.parameters(), lr=0.1))
        checkpointer = Checkpointer(FolderStorage(run), run, strategy, {"train_state": state})
        tag = epoch_tag(1, 10 + epoch_step) if epoch_step else epoch_tag(1)  # (epoch_step: a step checkpoint inside epoch 2)
        checkpointer.save(tag, cfg.to_dict(), metrics or {}, metrics is not None)  # with metrics: also best.pt
        return run

    return make


def _label_less_root(tiny_root, tmp_path, n=5) -> str:
    """A Miniscapes folder whose train/val are tiny_root's and whose test split has rgb/ only,
    like the real Miniscapes download."""
    root = tmp_path / "miniscapes"
    (root / "test" / "rgb").mkdir(parents=True)
    for split in ("train", "val"):
        os.symlink(os.path.join(tiny_root, split), root / split)
    for i in range(n):
        shutil.copy(os.path.join(tiny_root, "test", "rgb", f"{i}.jpg"), root / "test" / "rgb" / f"{i}.jpg")
    return str(root)


def _evaluate(capsys, *args) -> tuple[int, str, str]:
    rc = evaluate_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_label_less_test_split_exports_without_extra_flags(tiny_root, tmp_path, make_run, capsys):
    root = _label_less_root(tiny_root, tmp_path)
    run = make_run(DataConfig(root=root))
    out = tmp_path / "export"
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--split", "test", "--export", out, "--viz", "2")
    assert rc == 0, err
    assert f"5 test samples from {root}/test" in stdout
    assert f"no metrics computed: {root}/test has no labels" in stdout and "mIoU" not in stdout
    assert sorted(os.listdir(out / "semseg")) == sorted(os.listdir(out / "depth")) == [f"{i}.png" for i in range(5)]
    assert len(os.listdir(out / "viz")) == 2
    assert decode_semseg((out / "semseg/3.png").read_bytes()).shape == (64, 128)
    assert Image.open(out / "viz/0.png").size == (2 * 128, 2 * 64)  # rgb | prediction: no empty ground-truth panels
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # --no-metrics still works (and then says nothing about labels)
    rc, stdout, _ = _evaluate(capsys, "--checkpoint", run, "--split", "test", "--no-metrics")
    assert rc == 0 and "no metrics computed" not in stdout
    # what cannot be done is an error, not an exit 0 without it
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--split", "test", "--json", tmp_path / "m.json")
    assert rc == 2 and f"{root}/test has no labels (rgb only), so no metrics and no --json: leave it out" in err
    assert not (tmp_path / "m.json").exists()
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--split", "test", "--viz", "3")
    assert rc == 2 and "--viz is for --export, which is not given" in err
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--split", "test", "--overwrite")
    assert rc == 2 and "--overwrite is for --export and --json, neither of which is given" in err


def test_evaluate_checks_its_outputs_before_the_long_pass_and_names_exports_by_stem(tiny_root, tmp_path, make_run, capsys):
    root = tmp_path / "m"
    shutil.copytree(f"{tiny_root}/val", root / "val")
    for mod, ext in (("rgb", "jpg"), ("semseg", "png"), ("depth", "png")):
        os.rename(root / f"val/{mod}/2.{ext}", root / f"val/{mod}/zurich_a.{ext}")
    run = make_run(DataConfig(root=str(root)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--export", tmp_path / "full", "--json", tmp_path / "m.json")
    assert rc == 2 and "full exists and is not empty (pass --overwrite" in err and "mIoU" not in stdout, stdout + err
    assert not (tmp_path / "m.json").exists()
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--export", "s3://b/preds")
    assert rc == 2 and "s3://b/preds: this output is written to a local folder" in err and not os.path.exists("s3:")
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--export", tmp_path / "e", "--json", tmp_path / "sub/m.json",
                                "--viz", "0")
    assert rc == 0, err
    assert "miou" in json.loads((tmp_path / "sub/m.json").read_text())
    names = sorted(os.listdir(tmp_path / "e/semseg"))
    assert len(names) == 24 and "zurich_a.png" in names and "2.png" not in names and "1.png" in names
    # a --json that would replace what is read, a folder, or an existing file: refused before the pass
    best = os.path.join(run, "checkpoints/epoch-0001/state.pt")  # (what is evaluated)
    size = os.path.getsize(best)
    for target, overwrite, message in ((best, True, f"--json {best} is "), (root / "val/semseg/1.png", True, "is part of the input"),
                                       (tmp_path / "e", False, "is a folder: give the path of a file"),
                                       (tmp_path / "sub/m.json", False, "exists (pass --overwrite to replace it)"),
                                       (root / "val/rgb/1.jpg/m.json", False, "is a file, not a folder")):
        rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--json", target, *(["--overwrite"] if overwrite else []))
        assert rc == 2 and message in err and "mIoU" not in stdout, (target, err)
    assert os.path.getsize(best) == size
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--json", tmp_path / "sub/m.json", "--overwrite")
    assert rc == 0, err
    # an export into a folder of the data read, with --overwrite: refused (it would replace the split)
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--export", root / "val", "--overwrite")
    assert rc == 2 and f"{root}/val is part of the input {root}" in err and os.path.isdir(root / "val/rgb")
    for _ in range(2):  # an export kept beside the data is replaced by the next one, as anywhere
        rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--export", root / "preds", "--overwrite", "--viz", "0")
        assert rc == 0, err
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--json", root / "val/rgb/1.jpg/deeper/m.json")
    assert rc == 2 and f"{root}/val/rgb/1.jpg is a file, not a folder" in err and "mIoU" not in stdout, err


def test_evaluate_reads_the_shards_the_checkpoint_was_trained_on(s3_shards, tmp_path, make_run, capsys, monkeypatch):
    monkeypatch.setenv("STREETMTL_CACHE", str(tmp_path / "cache"))  # where the old fallback would have made a set
    run = make_run(DataConfig(shards=s3_shards))
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--json", tmp_path / "m.json", "--batch-size", "12")
    assert rc == 0, err
    assert f"24 val samples from {s3_shards} (val split)" in stdout
    assert json.loads((tmp_path / "m.json").read_text())["num_depth_images"] == 24  # the whole split was streamed
    assert not (tmp_path / "cache").exists()  # the old fallback (the cached synthetic set): never touched


def test_data_the_checkpoint_names_that_is_not_here_is_named_with_the_flag_to_give(tmp_path, make_run, capsys, monkeypatch):
    """A checkpoint names the data as training was given it: a relative path means the folder
    training ran in; evaluated from elsewhere (or on another machine), that is said, with the
    flag that names the data instead."""
    monkeypatch.chdir(tmp_path)
    run = make_run(DataConfig(root="data/miniscapes"))
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics")
    assert rc == 2 and err.strip() == (f"error: data/miniscapes, the data {run}/checkpoints/epoch-0001/state.pt was trained on "
                                       f"(relative to where training ran), is not here: give the data to evaluate with --root")
    gone = make_run(DataConfig(shards="/gone/shards"), name="on-shards")
    rc, _, err = _evaluate(capsys, "--checkpoint", gone, "--no-metrics")
    assert rc == 2 and err.strip() == (f"error: /gone/shards, the data {gone}/checkpoints/epoch-0001/state.pt was trained on, "
                                       f"is not here: give the data to evaluate with --shards")


def test_data_flag_overrides_with_a_folder_or_a_shard_set(s3_shards, tiny_root, make_run, capsys):
    on_shards, on_folder = make_run(DataConfig(shards=s3_shards), name="a"), make_run(DataConfig(root=tiny_root), name="b")
    rc, stdout, err = _evaluate(capsys, "--checkpoint", on_shards, "--data", tiny_root, "--split", "test", "--no-metrics")
    assert rc == 0 and f"16 test samples from {tiny_root}/test" in stdout, err
    for data in (s3_shards, s3_shards + "/manifest.json"):
        rc, stdout, err = _evaluate(capsys, "--checkpoint", on_folder, "--data", data, "--no-metrics")
        assert rc == 0 and f"24 val samples from {s3_shards} (val split)" in stdout, err
        assert "note:" not in stdout  # the size it trained at
    rc, _, err = _evaluate(capsys, "--checkpoint", on_folder, "--data", "/nowhere/at/all", "--no-metrics")
    assert rc == 2 and err.strip() == ("error: /nowhere/at/all does not exist: neither a Miniscapes folder nor a shard set "
                                       "(a prefix holding manifest.json)")
    rc, _, err = _evaluate(capsys, "--checkpoint", on_folder, "--root", "", "--no-metrics")  # (an unset variable)
    assert rc == 2 and "error: --root/--shards '' names no data (an unset variable?)" in err, err
    smaller = make_run(DataConfig(root=tiny_root), input_size=(32, 64), name="c")  # trained at another size: said
    for data, where in ((tiny_root, "folder"), (s3_shards, "manifest")):
        rc, stdout, err = _evaluate(capsys, "--checkpoint", smaller, "--data", data, "--no-metrics")
        assert rc == 0 and f"{smaller}/checkpoints/epoch-0001/state.pt trained at 32x64; these 64x128 images are evaluated at their own size" in stdout, where


def test_which_data_a_config_means(s3_shards, tiny_root):
    shards = ExperimentConfig(data=DataConfig(shards=s3_shards))
    assert resolve_source(shards) == DataSource("shards", s3_shards)
    assert resolve_source(shards, tiny_root) == DataSource("folder", tiny_root)
    assert resolve_source(ExperimentConfig(), "s3://b/p/manifest.json").is_shards  # named, not looked up
    assert resolve_source(ExperimentConfig(data=DataConfig(root=tiny_root))) == DataSource("folder", tiny_root)


def test_a_folder_that_is_also_a_shard_set_is_refused_by_the_flag_that_cannot_tell_them_apart(tiny_root, tmp_path):
    """Shards written into a Miniscapes folder leave two data sets under one name: --data (told
    apart by a manifest) would read the shards while the user meant the folder, or the reverse."""
    import shutil

    both = shutil.copytree(tiny_root, tmp_path / "both")
    (both / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{both} holds both a shard set \(manifest.json\) and a Miniscapes folder "
                                         rf"\(train/rgb/\): which one is meant cannot be told"):
        resolve_source(ExperimentConfig(), str(both))
    assert resolve_source(ExperimentConfig(data=DataConfig(root=str(both)))) == DataSource("folder", str(both))  # a flag that says


# ------------------------------------------------------------------------------ prediction

def _odd_images(folder) -> dict[str, tuple[int, int]]:
    """Images of several sizes, formats and modes; returns name -> (H, W)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (37, 91, 3), dtype=np.uint8)).save(os.path.join(folder, "odd.png"))
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(os.path.join(folder, "photo.jpg"), quality=90)
    Image.fromarray(rng.integers(0, 255, (48, 60, 4), dtype=np.uint8), "RGBA").save(os.path.join(folder, "alpha.png"))
    Image.fromarray(rng.integers(0, 255, (30, 41), dtype=np.uint8), "L").save(os.path.join(folder, "grey.JPEG"))
    with open(os.path.join(folder, "notes.txt"), "w") as fh:
        fh.write("not an image")
    return {"odd": (37, 91), "photo": (150, 200), "alpha": (48, 60), "grey": (30, 41)}


def test_predictions_have_each_images_size_and_files_match(tmp_path, make_run):
    sizes = _odd_images(tmp_path / "imgs")
    model = load_model(make_run(DataConfig()), "cpu")
    out = tmp_path / "pred"
    assert predict_to_folder(model, str(tmp_path / "imgs"), str(out), viz=1) == 4
    order = ["alpha", "grey", "odd", "photo"]  # natural order of the stems
    results = predict_images(model, [str(tmp_path / "imgs" / f) for f in ("alpha.png", "grey.JPEG", "odd.png", "photo.jpg")])
    assert sorted(os.listdir(out / "viz")) == ["alpha.png"]
    for stem, (labels, depth_m) in zip(order, results):
        assert labels.shape == depth_m.shape == sizes[stem] and labels.dtype == np.uint8 and depth_m.dtype == np.float32
        assert labels.max() < 19 and (depth_m > 0).all()
        assert np.array_equal(decode_semseg((out / "semseg" / f"{stem}.png").read_bytes()), labels)
        codes = np.array(Image.open(out / "depth" / f"{stem}.png"))
        assert np.array_equal(codes, metres_to_disparity_png(depth_m))
        assert np.array_equal(decode_depth((out / "depth" / f"{stem}.png").read_bytes())[0], disparity_png_to_metres(codes)[0])


def test_at_the_models_own_size_prediction_is_the_plain_forward_pass(tiny_root, make_run):
    """No resizing when an image already has the input size: the outputs equal the network's
    (the same normalisation as training and evaluation)."""
    model = load_model(make_run(DataConfig()), "cpu")
    rgb = np.array(Image.open(os.path.join(tiny_root, "val/rgb/0.jpg")).convert("RGB"))
    [(labels, depth_m)] = predict_images(model, [rgb])
    ref_labels, ref_depth = predict(model.model, normalize_rgb(torch.from_numpy(rgb)[None], False), model.codec, model.amp())
    assert np.array_equal(labels, ref_labels[0].numpy()) and np.allclose(depth_m, ref_depth[0].numpy(), rtol=1e-5)
    # a bare module works too, given its codec and size; without a size it says which flag to pass
    bare = predict_images(model.model, [rgb], size=(64, 128), codec=DepthCodec("log"))
    assert np.array_equal(bare[0][0], labels)
    with pytest.raises(ValueError, match="--size"):
        predict_images(model.model, [rgb], codec=DepthCodec("log"))


def test_a_checkpoint_whose_stored_config_this_version_cannot_use_is_named(tiny_root, tmp_path, make_run):
    """The config inside a checkpoint (edited, or written by a newer version) is the file's, not
    flags the user gave: errors name the checkpoint; one without a model part never silently
    builds the default architecture."""
    from mtl.checkpoint import checkpoint_bytes, load_safely
    from mtl.predict import load_model

    run = make_run(DataConfig(root=tiny_root))
    state = load_safely(open(f"{run}/checkpoints/epoch-0001/state.pt", "rb").read(), "state.pt")
    for change, message in [(lambda c: c["model"].update(arch="nosuch"),
                             r"its stored config cannot be used by this version of streetmtl \(--arch must be one of"),
                            (lambda c: c["model"].update(newfield=1), r"cannot be used by this version of streetmtl \(unknown config"),
                            (lambda c: c.pop("model"), r"lacks a usable config or model \(KeyError: 'config.model'\)")]:
        config = json.loads(json.dumps(state["config"]))
        change(config)
        file = tmp_path / "edited.pt"
        file.write_bytes(checkpoint_bytes({k: v for k, v in state.items() if k != "format"} | {"config": config}))
        with pytest.raises(ValueError, match=rf"checkpoint {file}(:|) .*{message}"):
            load_model(str(file))


def test_a_step_checkpoint_says_how_far_into_its_epoch_it_is(tiny_root, make_run, capsys):
    run = make_run(DataConfig(root=tiny_root), name="inside", epoch_step=3)
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics")
    assert rc == 0 and "checkpoints/epoch-0001-step-00000013/state.pt: deeplabv3p, 3 steps into epoch 2," in stdout, stdout + err


def test_a_single_task_models_export_holds_its_own_task_only(tiny_root, tmp_path, make_run, capsys):
    """A --tasks semseg (or depth) run never trained its other head: its exports (evaluate's and
    predict's) and predict_images leave that task out, and the commands say so."""
    seg = make_run(DataConfig(root=tiny_root), name="seg", tasks=("semseg",))
    dep = make_run(DataConfig(root=tiny_root), name="dep", tasks=("depth",))
    rc, stdout, err = _evaluate(capsys, "--checkpoint", seg, "--no-metrics", "--export", tmp_path / "e-seg", "--viz", "1")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "e-seg")) == ["semseg", "viz"]
    assert "(semseg/; viz/ for the first 1); no depth/: the model was trained with --tasks semseg only, its depth head never learned" in stdout
    assert Image.open(next((tmp_path / "e-seg/viz").iterdir())).size == (3 * 128, 64)  # rgb | GT | prediction, one row
    rc, stdout, err = _predict(capsys, "--checkpoint", dep, "--images", f"{tiny_root}/test/rgb", "--out", tmp_path / "p-dep",
                               "--viz", "1", "--device", "cpu")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "p-dep")) == ["depth", "viz"] and "no semseg/" in stdout
    assert Image.open(next((tmp_path / "p-dep/viz").iterdir())).size == (2 * 128, 64)  # rgb | prediction
    [(labels, depth_m)] = predict_images(seg, [f"{tiny_root}/test/rgb/0.jpg"], device="cpu")
    assert labels.shape == (64, 128) and depth_m is None
    rc, _, err = _evaluate(capsys, "--checkpoint", seg, "--as-submitted")  # (it quantises a depth there is none of)
    assert rc == 2 and f"--as-submitted scores the depth as its PNGs would hold it, and {seg}/checkpoints/epoch-0001/state.pt " \
                       f"predicts semseg only: leave it out" in err, err


def test_labels_of_a_large_photo_are_upscaled_a_band_of_rows_at_a_time_as_interpolate_would(monkeypatch):
    """All class scores of a 48-megapixel photo at once would take 3.6 GB; a band at a time
    gives the labels that upscaling everything at once gives."""
    import torch.nn.functional as F

    import mtl.predict

    torch.manual_seed(0)
    for (h, w), (height, width) in [((8, 16), (37, 61)), ((64, 128), (300, 400)), ((16, 32), (16, 100)), ((64, 128), (32, 64))]:
        logits = torch.randn(1, 19, h, w)
        monkeypatch.setattr(mtl.predict, "_BAND_VALUES", 19 * width * 5)  # bands of 5 rows
        whole = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).argmax(1)[0]
        assert torch.equal(mtl.predict._labels(logits, (height, width)), whole.to(torch.uint8))


def test_a_failed_export_leaves_no_metrics_file_that_would_block_the_rerun(tiny_root, tmp_path, make_run, capsys, monkeypatch):
    import mtl.export

    def fails(*a, **k):
        raise ValueError("the depth predicted for 0: depth is not a number at 8192 pixel(s)")

    run = make_run(DataConfig(root=tiny_root))
    monkeypatch.setattr(mtl.export, "export_predictions", fails)
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--json", tmp_path / "m.json", "--export", tmp_path / "e")
    assert rc == 2 and "depth is not a number" in err and not (tmp_path / "m.json").exists()
    monkeypatch.undo()
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--json", tmp_path / "m.json", "--export", tmp_path / "e", "--viz", "0")
    assert rc == 0 and json.loads((tmp_path / "m.json").read_text())["miou"] >= 0, err
    # so do training's validation pictures (TensorBoard, MLflow)
    from mtl.engine import draw_predictions

    batch = {"rgb": torch.zeros(1, 3, 4, 6), "semseg": torch.zeros(1, 4, 6, dtype=torch.long), "depth": torch.full((1, 4, 6), 9.0),
             "valid": torch.ones(1, 4, 6, dtype=torch.bool)}
    pred = (torch.zeros(1, 4, 6, dtype=torch.long), torch.full((1, 4, 6), 9.0))
    assert [p.shape for p in draw_predictions(batch, *pred, 1)] == [(8, 18, 3)]  # two rows of rgb | truth | prediction
    assert [p.shape for p in draw_predictions(batch, *pred, 1, ("depth",))] == [(4, 18, 3)]


def _predict(capsys, *args) -> tuple[int, str, str]:
    rc = predict_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_cli_and_its_errors(tmp_path, make_run, capsys, monkeypatch):
    _odd_images(tmp_path / "imgs")
    run, old = make_run(DataConfig(), name="new"), make_run(DataConfig(), input_size=None, name="old")
    out = tmp_path / "out"
    rc, stdout, err = _predict(capsys, "--checkpoint", run, "--images", tmp_path / "imgs", "--out", out, "--viz", "3",
                               "--device", "cpu")
    assert rc == 0, err
    assert "wrote 4 predictions" in stdout and "input size 64x128" in stdout
    assert [len(os.listdir(out / d)) for d in ("semseg", "depth", "viz")] == [4, 4, 3]
    rc, _, err = _predict(capsys, "--checkpoint", run, "--images", tmp_path / "imgs/odd.png", "--out", out)
    assert rc == 2 and "exists and is not empty" in err

    def fails(*args) -> str:
        target = tmp_path / "failed"
        rc, _, err = _predict(capsys, "--checkpoint", args[0], "--images", args[1], "--out", target, *args[2:])
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(target) and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nothing half-written
        return err

    (tmp_path / "empty").mkdir()
    assert "no images (.jpg, .jpeg, .png) in" in fails(run, tmp_path / "empty")
    (tmp_path / "imgs" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert f"{tmp_path}/imgs/zz-broken.jpg: cannot decode image" in fails(run, tmp_path / "imgs", "--batch-size", "2")
    (tmp_path / "imgs" / "zz-broken.jpg").write_bytes(b"")  # (PIL's words name a buffer: the file's are said instead)
    assert f"{tmp_path}/imgs/zz-broken.jpg: cannot decode image (the file is empty (0 bytes))" in fails(run, tmp_path / "imgs")
    os.remove(tmp_path / "imgs" / "zz-broken.jpg")
    assert "does not record the input size it was trained at: pass --size HxW" in fails(old, tmp_path / "imgs")
    assert "--size must be HxW" in fails(old, tmp_path / "imgs", "--size", "64by128")
    assert "checkpoint not found" in fails(tmp_path / "nope.pt", tmp_path / "imgs")
    listed = sorted(os.listdir(tmp_path / "imgs"))
    for above in (tmp_path / "imgs", tmp_path):  # --overwrite never deletes the images it reads
        rc, _, err = _predict(capsys, "--checkpoint", run, "--images", tmp_path / "imgs", "--out", above, "--overwrite")
        assert rc == 2 and f"error: {above} holds the input {tmp_path}/imgs/" in err, err
        assert sorted(os.listdir(tmp_path / "imgs")) == listed
    rc, _, err = _predict(capsys, "--checkpoint", run, "--images", tmp_path / "imgs", "--out", run, "--overwrite")
    assert rc == 2 and f"error: {run} holds the input {run}/" in err and os.listdir(run)  # ... nor the checkpoint
    # ... nor the folder it runs in: `--out "$OUT" --overwrite` with OUT unset replaced it
    work = tmp_path / "work"
    (work / "precious").mkdir(parents=True)
    monkeypatch.chdir(work / "precious")
    for bad, said in (("", "--out '' names no folder (an unset variable?)"), (".", f"{work}/precious holds the folder this command"),
                      ("..", f"{work} holds the folder this command runs in ({work}/precious)")):
        rc, _, err = _predict(capsys, "--checkpoint", run, "--images", tmp_path / "imgs", "--out", bad, "--overwrite")
        assert rc == 2 and f"error: {said}" in err, err
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--export", "", "--no-metrics")
    assert rc == 2 and "--export '' names no folder (an unset variable?)" in err, err
    assert os.listdir(work) == ["precious"]
    rc, _, err = _predict(capsys, "--checkpoint", old, "--images", tmp_path / "imgs", "--out", tmp_path / "o2", "--size", "64x128")
    assert rc == 0, err


def test_unreachable_storage_is_one_error_naming_the_url(unreachable_s3):
    from mtl.predict import find_images
    from mtl.storage import StorageError

    with pytest.raises(StorageError, match=f"cannot reach s3://streetmtl/photos at endpoint {unreachable_s3}"):
        find_images("s3://streetmtl/photos")


@pytest.mark.slow
def test_a_real_run_on_shards_evaluates_and_predicts(s3_shards, tmp_path, capsys, in_process):
    """End to end: train one step on the S3 shards, then evaluate and predict from the run folder
    with no data flags: the trainer's checkpoint carries what both need."""
    from jobs.train import main as train_main

    r = in_process(train_main, ["--local", "--arch", "deeplabv3p", "--encoder", "resnet18", "--output-stride", "32", "--shards",
                                s3_shards, "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "1", "--workers", "0",
                                "--out", str(tmp_path), "--name", "x"])
    assert r.returncode == 0, r.stdout + r.stderr
    run = str(tmp_path / "x")
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--split", "test", "--export", tmp_path / "e",
                                "--viz", "0")
    assert rc == 0 and f"16 test samples from {s3_shards} (test split)" in stdout, err
    assert len(os.listdir(tmp_path / "e" / "semseg")) == 16
    img = tmp_path / "one.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img)
    [(labels, depth_m)] = predict_images(run, str(img), device="cpu")  # input size from the checkpoint
    assert labels.shape == depth_m.shape == (40, 50)


def test_an_export_from_shards_names_files_by_the_samples_stems(tiny_root, tmp_path, make_run, capsys):
    from data_prep.shard import shard_dataset

    root = Path(_label_less_root(tiny_root, tmp_path, n=3))
    for old, new in (("0", "0007"), ("1", "zurich_a")):  # stems as a folder may have them: padded, or names
        os.rename(root / f"test/rgb/{old}.jpg", root / f"test/rgb/{new}.jpg")
    shard_dataset(str(root), str(tmp_path / "shards"), shard_size="2", splits=("test",), workers=1)
    run = make_run(DataConfig(root=str(root)))
    rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--data", tmp_path / "shards", "--split", "test", "--export",
                                tmp_path / "e", "--viz", "0")
    assert rc == 0 and "3 test samples" in stdout, err
    assert sorted(os.listdir(tmp_path / "e" / "semseg")) == ["0007.png", "2.png", "zurich_a.png"]  # as exported from the folder


def test_as_submitted_scores_the_depth_the_exported_pngs_hold(tiny_root, tmp_path, make_run, capsys):
    """--as-submitted: the depth metrics of the exported disparity PNGs (clamped to 4-300 m,
    quantised), as the grader computes them from a submission; by default, the raw prediction's."""
    from mtl.data.miniscapes import disparity_png_to_metres
    from mtl.metrics import MultiTaskMetrics

    run = make_run(DataConfig(root=tiny_root))
    for flags, name in (((), "raw"), (("--as-submitted",), "sub")):
        rc, stdout, err = _evaluate(capsys, "--checkpoint", run, *flags, "--json", tmp_path / f"{name}.json", "--export",
                                    tmp_path / name, "--viz", "0")
        assert rc == 0, err
    assert "depth as submitted (4-300 m, 255 codes)" in stdout
    graded = MultiTaskMetrics()
    for stem in sorted(os.listdir(f"{tiny_root}/val/rgb")):
        stem = stem.removesuffix(".jpg")
        pred, _ = disparity_png_to_metres(np.array(Image.open(tmp_path / f"sub/depth/{stem}.png")))
        gt, valid = disparity_png_to_metres(np.array(Image.open(f"{tiny_root}/val/depth/{stem}.png")))
        labels = decode_semseg((tmp_path / f"sub/semseg/{stem}.png").read_bytes())
        gt_labels = decode_semseg(open(f"{tiny_root}/val/semseg/{stem}.png", "rb").read())
        graded.update(torch.from_numpy(labels.astype(np.int64))[None], torch.from_numpy(pred)[None],
                      {"semseg": torch.from_numpy(gt_labels.astype(np.int64))[None], "depth": torch.from_numpy(gt)[None],
                       "valid": torch.from_numpy(valid)[None]})
    expected, sub, raw = graded.compute(), _strict_json(tmp_path / "sub.json"), _strict_json(tmp_path / "raw.json")
    for key in ("si_log_rmse", "abs_rel", "rmse", "miou"):
        assert sub[key] == pytest.approx(expected[key], rel=1e-4), key
    assert raw["si_log_rmse"] != pytest.approx(sub["si_log_rmse"], rel=1e-4) and raw["miou"] == sub["miou"]
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--as-submitted")
    assert rc == 2 and "--as-submitted reports metrics, which --no-metrics turns off: leave it out" in err


def test_flags_that_would_do_nothing_or_lose_an_output_are_refused_before_any_work(tmp_path, capsys):
    """Refused before the checkpoint is read (it does not exist here): a --json inside --export
    (the export's folder, written whole after the metrics, would replace it), a negative --viz;
    a batch size below 1 from Python too."""
    from mtl.predict import predict_images

    missing = tmp_path / "no-run"
    for args, said in ((("--export", tmp_path / "e", "--json", tmp_path / "e" / "m.json"), "overlap: the export's folder is written whole"),
                       (("--export", tmp_path / "e", "--json", tmp_path / "e"), "overlap"),
                       (("--export", tmp_path / "j" / "e", "--json", tmp_path / "j"), "overlap"),
                       (("--export", tmp_path / "e", "--viz", "-1"), "--viz at least 0")):
        rc, _, err = _evaluate(capsys, "--checkpoint", missing, *args)
        assert rc == 2 and said in err and "no-run" not in err, err
    rc, _, err = _predict(capsys, "--checkpoint", missing, "--images", tmp_path, "--out", tmp_path / "p", "--viz", "-1")
    assert rc == 2 and "--viz at least 0, got 4 and -1" in err, err
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        predict_images(torch.nn.Identity(), [np.zeros((8, 8, 3), np.uint8)], size=(8, 8), batch_size=0, codec=DepthCodec())
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "p")


def test_arrays_and_paths_mix_and_bad_ones_are_named(tmp_path, make_run):
    from mtl.predict import read_image

    model = load_model(make_run(DataConfig()), "cpu")
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    got = predict_images(model, [np.full((10, 12, 3), 90, np.uint8), str(tmp_path / "a.png")])
    assert [g[0].shape for g in got] == [(10, 12), (20, 30)]
    with pytest.raises(ValueError, match=r"image 1: expected an HxWx3 uint8 array, got shape \(10, 12\) uint8"):
        predict_images(model, [np.zeros((4, 4, 3), np.uint8), np.zeros((10, 12), np.uint8)])
    with pytest.raises(FileNotFoundError, match="image not found: /no/such.png"):
        read_image("/no/such.png")


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    from mtl.predict import read_image

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:5] = 255  # a white band along the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to show (as phones save portrait photos)
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(str(tmp_path / "phone.jpg"))
    assert upright.shape == (30, 20, 3)  # as viewers show it, and as the predictions are written
    assert upright[:, -5:].mean() > 200 and upright[:, :10].mean() < 50  # the band is now on the right


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(open(path).read(), parse_constant=refuse)


def test_delta_m_evaluates_the_baselines_on_the_same_split(tiny_root, tmp_path, make_run, capsys):
    """The baselines' best.pt is evaluated on the images the model is: with the same weights Δm is
    0 on any split, whatever their run folders recorded at training time (here: nonsense)."""
    data = DataConfig(root=tiny_root)
    run = make_run(data, name="mtl", metrics={"score": 1.0})  # (with best.pt, which Δm compares)
    seg = make_run(data, name="seg", tasks=("semseg",), metrics={"miou": 99.0})
    dep = make_run(data, name="dep", tasks=("depth",), metrics={"si_log_rmse": 1.0, "abs_rel": 0.01, "rmse": 0.1, "delta1": 99.0})
    for split in ("val", "test"):
        out = tmp_path / f"{split}.json"
        rc, stdout, err = _evaluate(capsys, "--checkpoint", run, "--split", split, "--baselines", seg, dep, "--json", out)
        assert rc == 0, err
        metrics = _strict_json(out)  # valid JSON: a class absent from the split is null, not NaN
        assert metrics["score"] == -metrics["delta_m"]  # judged by Δm, as training judges such a run
        assert metrics["delta_m"] == 0.0 and f"Δm +0.00 % against the single-task baselines on the same {split} images" in stdout
        assert stdout.startswith(f"{run}/best.pt: ")  # best epoch against best epochs, not the run's latest checkpoint
        assert f"mIoU {metrics['miou']:.2f}" in stdout and any(v is None for k, v in metrics.items() if k.startswith("iou/"))
    # one checkpoint's folder is that checkpoint (a run folder stands for its best.pt)
    rc, stdout, err = _evaluate(capsys, "--checkpoint", f"{run}/checkpoints/epoch-0001", "--baselines", seg, dep)
    assert rc == 0 and stdout.startswith(f"{run}/checkpoints/epoch-0001/state.pt: deeplabv3p, epoch 1,"), stdout + err
    assert "has no best.pt" not in stdout
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--baselines", seg, "--json", tmp_path / "x.json")
    assert rc == 2 and "Δm needs a single-task baseline for depth" in err
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--baselines", seg, tmp_path / "nope")
    assert rc == 2 and f"error: --baselines {tmp_path}/nope: checkpoint not found: {tmp_path}/nope/best.pt" in err
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--baselines", seg, dep, "--json", tmp_path / "x.json")
    assert rc == 2 and "--json and --baselines report metrics, which --no-metrics turns off" in err
    assert not (tmp_path / "x.json").exists()
    # --export into the data's own folder would delete it with --overwrite: refused whatever the flag
    rc, _, err = _evaluate(capsys, "--checkpoint", run, "--no-metrics", "--export", tiny_root, "--overwrite")
    assert rc == 2 and f"{tiny_root} holds the input {tiny_root}" in err and os.path.isdir(f"{tiny_root}/val/rgb")
    for used in (run, seg):  # nor the checkpoint, nor a baseline's
        rc, _, err = _evaluate(capsys, "--checkpoint", run, "--baselines", seg, dep, "--export", used, "--overwrite")
        assert rc == 2 and f"{used} holds the input {used}" in err and os.listdir(used)


def test_an_export_of_images_of_several_sizes_in_one_batch_names_them_and_writes_nothing(tmp_path):
    import contextlib

    from mtl.export import export_predictions

    samples = [{"rgb": torch.zeros(h, 8, 3, dtype=torch.uint8), "index": torch.tensor(i)} for h, i in ((4, 0), (6, 1))]
    with pytest.raises(ValueError, match=r"differ in 'rgb': sample 0 is \[4, 8, 3\], sample 1 is \[6, 8, 3\]"):
        export_predictions(torch.nn.Identity(), samples, str(tmp_path / "out"), DepthCodec(), torch.device("cpu"),
                           contextlib.nullcontext(), batch_size=2)
    assert os.listdir(tmp_path) == []


def test_a_depth_prediction_that_is_not_a_number_is_refused_by_name(tmp_path):
    """A diverged model's NaN has no disparity code (0 would mark the pixel "no measurement" in
    a submission): the writer names the image; `export_predictions` then publishes nothing."""
    from mtl.export import make_output_folders, write_prediction

    make_output_folders(str(tmp_path))
    depth = np.full((4, 8), 10.0, np.float32)
    depth[1, 2] = np.nan
    with pytest.raises(ValueError, match="the depth predicted for 17: depth is not a number at 1 pixel"):
        write_prediction(str(tmp_path), "17", np.zeros((4, 8), np.uint8), depth)
    assert not os.path.exists(tmp_path / "depth" / "17.png")
