"""Run identity as a user meets it: names that cannot collide, config.json, resume rules, logs."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mtl.config import DataConfig, DistConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from mtl.checkpoint import CheckpointIndex
from mtl.runs import RunConflict, RunFolder, check_same_training, config_hash, prepare_run, resolve_config, run_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_with(**parts) -> ExperimentConfig:
    base = ExperimentConfig(model=ModelConfig(arch="branched", encoder="resnet18"))
    return dataclasses.replace(base, **{k: dataclasses.replace(getattr(base, k), **v) for k, v in parts.items()})


def test_names_differ_for_every_change_that_changes_training():
    base = cfg_with()
    for change in ({"optim": {"lr": 4.4e-4}}, {"train": {"seed": 1}}, {"data": {"root": "s3://b/miniscapes"}},
                   {"data": {"scale_max": 1.5}}, {"data": {"hflip": False}}, {"optim": {"semseg_weight": 0.55}},
                   {"dist": {"num_workers": 4}}):
        assert run_name(cfg_with(**change)) != run_name(base), change
    assert run_name(base).startswith("branched_resnet18_os16_adam-lr4e-4_w0.5_bs16_e16-")
    assert "lr4.4e-4" in run_name(cfg_with(optim={"lr": 4.4e-4}))


def test_operational_settings_and_spelled_out_defaults_keep_the_name():
    base = cfg_with()
    same = cfg_with(data={"workers": 7, "prefetch": 2}, train={"out": "elsewhere", "log_every": 3, "device": "cpu"},
                    dist={"cpus_per_worker": 10, "max_failures": 9, "use_gpu": True}, model={"output_stride": 16})
    assert run_name(same) == run_name(base) and config_hash(same) == config_hash(base)
    # the synthetic set's settings only matter when no data is given
    assert run_name(cfg_with(data={"root": "/d", "synthetic_size": (64, 128)})) == run_name(cfg_with(data={"root": "/d"}))


def test_resolved_config_round_trips_through_config_json(tmp_path):
    cfg = resolve_config(cfg_with(train={"out": str(tmp_path)}, data={"crop": (32, 64)}))
    assert cfg.model.output_stride == 16 and cfg.model.aspp_rates == (6, 12, 18) and cfg.train.name == run_name(cfg)
    folder = RunFolder(f"{tmp_path}/{cfg.train.name}")
    folder.write_config(cfg)
    assert folder.read_config() == cfg
    (tmp_path / cfg.train.name / "config.json").write_text("{\"model\": {\"nope\": 1}}")
    with pytest.raises(ValueError, match="config.json is not a streetmtl config"):
        folder.read_config()


def test_a_run_stored_before_a_setting_existed_keeps_its_network_and_name(tmp_path):
    from mtl.cli import read_config
    from mtl.runs import identity, stored_config

    old = resolve_config(cfg_with(model={"dilated_convs": "all"}, train={"out": str(tmp_path)}))
    assert "model.dilated_convs" not in identity(old)  # its name is the one it had before the setting existed
    stored = old.to_dict()
    del stored["model"]["dilated_convs"]  # as streetmtl wrote it then
    assert stored_config(stored).model.dilated_convs == "all"
    folder = RunFolder(f"{tmp_path}/{old.train.name}")
    (tmp_path / old.train.name).mkdir()
    (tmp_path / old.train.name / "config.json").write_text(json.dumps(stored))
    assert folder.read_config() == old
    assert read_config(f"{folder.url}/config.json") == old  # --config <run>/config.json continues it
    (tmp_path / "mine.json").write_text(json.dumps({"model": {"arch": "branched"}}))
    assert read_config(str(tmp_path / "mine.json")).model.dilated_convs == "second"  # a file of one's own: defaults
    today = resolve_config(cfg_with(train={"out": str(tmp_path), "name": old.train.name}))
    with pytest.raises(RunConflict, match=r"model.dilated_convs .*'second'. It predates today's default there: "
                                          r"--dilated-convs all continues it"):
        check_same_training(old, today, "run x")
    # the old command with --resume names a new run (the setting is in the name's hash): the hint says how to continue
    again = dataclasses.replace(today, train=dataclasses.replace(today.train, name=None, resume=True))
    with pytest.raises(RunConflict, match=rf"nothing to resume .*{old.train.name} \(differs in model.dilated_convs 'all' -> "
                                          r"'second'. It predates today's default there: --dilated-convs all continues it\)"):
        prepare_run(again)
    famo = cfg_with(optim={"task_weighting": "famo"}, model={"dilated_convs": "all"})  # (a default that did not change: no hint)
    with pytest.raises(RunConflict) as refused:
        check_same_training(old, famo, "run x")
    assert "predates" not in str(refused.value) and "optim.task_weighting 'fixed' -> 'famo'" in str(refused.value)
    # a run at output stride 32 (no stage dilated) resumed at 16: the values as stored, and no hint (the stride differs)
    os32 = cfg_with(model={"output_stride": 32})
    with pytest.raises(RunConflict) as refused:
        check_same_training(os32, cfg_with(), "run x")
    assert "model.output_stride 32 -> 16" in str(refused.value) and "predates" not in str(refused.value)
    assert "model.dilated_convs 'second' -> 'second'" not in str(refused.value)
    # at output stride 32 no stage is dilated: the setting changes nothing, and names nothing
    os32 = {"output_stride": 32}
    assert run_name(cfg_with(model=os32)) == run_name(cfg_with(model={**os32, "dilated_convs": "all"}))


def test_adam_decays_weights_as_the_reports_and_runs_from_before_keep_adamw():
    """The report's Adam (the course skeleton's torch Adam) adds the decay to the gradient: a
    weight the data does not move shrinks. AdamW's decoupled decay (what `--optimizer adam` was
    before this setting) shrinks it by LR x decay a step, at the defaults almost nothing. A run
    stored without the setting keeps AdamW (and its name); under SGD it changes nothing."""
    from mtl.engine import build_optimizer
    from mtl.runs import identity, stored_config

    def after_steps(cfg, steps=100):
        w = torch.nn.Linear(1, 1000, bias=False)
        torch.nn.init.constant_(w.weight, 0.05)
        opt, noise = build_optimizer(w, cfg), torch.Generator().manual_seed(0)
        for _ in range(steps):
            opt.zero_grad()
            (w(torch.ones(1, 1)) * torch.randn(1000, generator=noise) * 1e-6).sum().backward()  # (the data: noise)
            opt.step()
        return float(w.weight.detach().mean())

    today = cfg_with()
    assert today.optim.weight_decay_style == "l2" and after_steps(today) < 0.03
    old = cfg_with(optim={"weight_decay_style": "decoupled"})
    assert abs(after_steps(old) - 0.05) < 0.002  # (4e-4 x 1e-4 a step, and noise that averages out)
    stored = old.to_dict()
    del stored["optim"]["weight_decay_style"]  # (as streetmtl wrote it before)
    assert stored_config(stored) == old and "optim.weight_decay_style" not in identity(old)
    sgd = {"optimizer": "sgd"}
    assert run_name(cfg_with(optim=sgd)) == run_name(cfg_with(optim={**sgd, "weight_decay_style": "decoupled"}))
    with pytest.raises(RunConflict, match=r"optim.weight_decay_style 'decoupled' -> 'l2'. It predates today's default "
                                          r"there: --weight-decay-style decoupled continues it"):
        check_same_training(resolve_config(old), resolve_config(today), "run x")


def test_one_place_spelt_two_ways_is_one_run():
    """A shell's completion adds a slash, a user types ./: the same data, the same run (name and
    resume); another folder is another run."""
    spelt = [cfg_with(data={"root": r}) for r in ("data/cityscapes", "./data/cityscapes/", "data//cityscapes")]
    assert len({run_name(c) for c in spelt}) == 1
    check_same_training(spelt[0], spelt[1], "run x")
    assert run_name(cfg_with(data={"shards": "s3://b/shards/"})) == run_name(cfg_with(data={"shards": "s3://b/shards"}))
    assert run_name(spelt[0]) != run_name(cfg_with(data={"root": "data/cityscapes-2"}))
    # the absolute path of a relative one (a local run continued on Ray, which needs it) resumes it
    # under its --name; a manifest's URL is its shard set (whether the data is where the run
    # trained, its checkpoints say: tests/test_train_local.py)
    check_same_training(spelt[0], cfg_with(data={"root": os.path.abspath("data/cityscapes")}), "run x")
    check_same_training(cfg_with(data={"shards": "s3://b/shards"}), cfg_with(data={"shards": "s3://b/shards/manifest.json"}), "run x")
    # (a relative path recorded elsewhere, say in a Ray worker's folder, cannot be resolved here: an
    # absolute one that ends with it may be the same place; one that does not is not)
    check_same_training(spelt[0], cfg_with(data={"root": "/anywhere/data/cityscapes"}), "run x")
    with pytest.raises(ValueError, match="data.root 'data/cityscapes' -> '/data/cityscapes-2'"):
        check_same_training(spelt[0], cfg_with(data={"root": "/data/cityscapes-2"}), "run x")


def test_a_new_run_may_not_crop_without_augmentation_but_an_old_one_resumes(tmp_path):
    """--crop with --no-augment was accepted, and the crop ignored: a new run is refused, naming
    both flags; a run of an earlier version that holds the pair resumes with the same flags."""
    cfg = cfg_with(data={"crop": (48, 96), "augment": False}, train={"out": str(tmp_path), "name": "r"})
    with pytest.raises(ValueError, match=r"--crop 48x96 is the augmentation's random crop, which --no-augment turns off"):
        prepare_run(cfg, lambda line: None)
    RunFolder(str(tmp_path / "r")).write_config(resolve_config(cfg))  # (an earlier version's run ...)
    with pytest.raises(ValueError, match=r"--crop 48x96 is the augmentation's random crop"):  # (... starting over: new)
        prepare_run(cfg, lambda line: None)
    (tmp_path / "r/checkpoints/epoch-0001").mkdir(parents=True)
    CheckpointIndex(str(tmp_path / "r")).commit("epoch-0001")  # (... with a checkpoint: it resumes)
    resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True, epochs=20))
    assert prepare_run(resumed, lambda line: None).data.crop == (48, 96)


def test_deep_supervision_averages_as_the_skeleton_and_runs_from_before_keep_the_sum():
    """Distillation predicts each task twice; the course skeleton (so the report's distillation
    runs) averaged the two losses, streetmtl summed them before the setting existed. A stored
    run without it keeps the sum (and its name); for a single-output architecture it changes
    nothing and names nothing."""
    from mtl.losses import DepthCodec, task_losses
    from mtl.runs import identity, stored_config

    torch.manual_seed(0)
    logits, depth = torch.randn(2, 19, 4, 6), torch.randn(2, 1, 4, 6)
    batch = {"semseg": torch.randint(0, 19, (2, 4, 6)), "depth": torch.full((2, 4, 6), 20.0), "valid": torch.ones(2, 4, 6, dtype=torch.bool)}
    once = task_losses({"semseg": [logits], "depth": [depth]}, batch, DepthCodec())
    twice = {"semseg": [logits, logits], "depth": [depth, depth]}
    assert torch.allclose(task_losses(twice, batch, DepthCodec()), once)
    assert torch.allclose(task_losses(twice, batch, DepthCodec(), "sum"), 2 * once)
    distil = {"model": {"arch": "distillation"}}
    today, old = cfg_with(**distil), cfg_with(**distil, optim={"deep_supervision": "sum"})
    assert today.optim.deep_supervision == "mean" and run_name(today) != run_name(old)
    stored = old.to_dict()
    del stored["optim"]["deep_supervision"]  # (as streetmtl wrote it before)
    assert stored_config(stored) == old and "optim.deep_supervision" not in identity(old)
    with pytest.raises(RunConflict, match=r"optim.deep_supervision 'sum' -> 'mean'. It predates today's default "
                                          r"there: --deep-supervision sum continues it"):
        check_same_training(resolve_config(old), resolve_config(today), "run x")
    assert run_name(cfg_with()) == run_name(cfg_with(optim={"deep_supervision": "sum"}))  # (branched: one output a task)


def test_a_checkpoint_stored_before_a_setting_existed_rebuilds_its_network(tmp_path):
    from mtl.checkpoint import checkpoint_bytes
    from mtl.engine import check_resumable
    from mtl.models import build_model
    from mtl.predict import load_model

    old = resolve_config(cfg_with(model={"dilated_convs": "all"}, train={"out": str(tmp_path)}))
    stored = old.to_dict()
    del stored["model"]["dilated_convs"]
    state = {"config": stored, "model": build_model(old.model).state_dict(), "train_state": {"epoch": 1}}
    (tmp_path / "state.pt").write_bytes(checkpoint_bytes(state))
    loaded = load_model(str(tmp_path / "state.pt"), "cpu")
    assert loaded.model.encoder.layer4[1].conv1.dilation == (2, 2)  # every 3x3 conv dilated, as it was trained
    resume = dataclasses.replace(old.train, resume=True)
    check_resumable(state, dataclasses.replace(old, train=resume))
    with pytest.raises(RunConflict, match="--dilated-convs all continues it"):
        check_resumable(state, dataclasses.replace(resolve_config(cfg_with(train={"out": str(tmp_path)})), train=resume))


def test_a_run_folder_is_reused_only_by_a_matching_resume(tmp_path):
    from mtl.checkpoint import CheckpointIndex

    cfg = resolve_config(cfg_with(train={"out": str(tmp_path), "name": "r"}))
    with pytest.raises(RunConflict, match=r"nothing to resume at .*/r$"):
        prepare_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)))
    prepare_run(cfg)  # a new run: fine, and it writes nothing
    assert not (tmp_path / "r").exists()
    RunFolder(f"{tmp_path}/r").write_config(cfg)
    said = []
    prepare_run(cfg, said.append)  # stopped before its first checkpoint: the same run starts over
    assert said == [f"run folder {tmp_path}/r has no checkpoint yet (it stopped before its first epoch ended): starting it over"]
    # ... and so does another one (a corrupt file mended, a smaller batch after running out of memory): nothing
    # trained is lost; the log says what changed
    said.clear()
    prepare_run(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3)), said.append)
    assert said == [f"run folder {tmp_path}/r has no checkpoint yet (it stopped before its first epoch ended): starting it over "
                    f"with optim.lr 0.0004 -> 0.001"]
    # Ray took the first checkpoint's report, but rank 0 died before latest.json: a checkpoint all the same,
    # which only a Ray run continues (its restore moves the pointer to it)
    from mtl.runs import RAY_SNAPSHOT

    (tmp_path / "r/checkpoints/epoch-0001").mkdir(parents=True)
    (tmp_path / "r" / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoints/epoch-0001"}}))
    with pytest.raises(RunConflict, match="already holds a run with checkpoints: pass --resume"):
        prepare_run(cfg)
    on_ray = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    assert prepare_run(on_ray) == on_ray
    ray_ahead = r"has checkpoint epoch-0001 in Ray's record, newer than .*continue it on Ray \(--resume, without --local\)"
    with pytest.raises(RunConflict, match=ray_ahead):
        prepare_run(on_ray, local=True)
    CheckpointIndex(f"{tmp_path}/r").commit("epoch-0000-step-00000004")  # a pointer behind Ray's record: the same
    with pytest.raises(RunConflict, match=ray_ahead):  # (a local run would resume step 4, then delete epoch-0001)
        prepare_run(on_ray, local=True)
    (tmp_path / "r/checkpoints/epoch-0001").rmdir()  # a record naming a folder that is gone: Ray drops it at its start
    assert prepare_run(on_ray, local=True) == on_ray
    (tmp_path / "r/checkpoints/epoch-0001").mkdir()
    CheckpointIndex(f"{tmp_path}/r").commit("epoch-0001")
    assert prepare_run(on_ray, local=True) == on_ray  # (the pointer caught up)
    with pytest.raises(RunConflict, match="already holds a run with checkpoints: pass --resume"):
        prepare_run(cfg)
    resume = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True, epochs=20, log_every=1),
                                 data=dataclasses.replace(cfg.data, workers=4))
    said = []
    assert prepare_run(resume, said.append).train.epochs == 20  # epochs may change; operational fields too
    assert said == ["resuming with changed train.epochs 16 -> 20: the LR plan is recomputed for the new length"]
    (tmp_path / "r/checkpoints/epoch-0001-step-00000009").mkdir()
    CheckpointIndex(f"{tmp_path}/r").commit("epoch-0001-step-00000009")  # (epoch 2 has begun: 1 epoch is too short)
    said.clear()
    with pytest.raises(RunConflict, match=r"--epochs 1, but .*/r/checkpoints/epoch-0001-step-00000009 has trained 1 epochs and "
                                          r"part of epoch 2 already \(--epochs 2 or more continues it\)"):
        prepare_run(dataclasses.replace(resume, train=dataclasses.replace(resume.train, epochs=1)), said.append)
    assert said == []  # (refused before it says what the resume would change)
    changed = dataclasses.replace(resume, optim=dataclasses.replace(resume.optim, lr=4.4e-4), train=dataclasses.replace(resume.train, seed=3))
    with pytest.raises(RunConflict, match=r"resume refused: run .*/r was trained with another configuration: "
                                          r"optim.lr 0.0004 -> 0.00044; train.seed 0 -> 3"):
        prepare_run(changed)
    with pytest.raises(RunConflict, match=r"/r already holds a run with checkpoints, trained with another configuration "
                                          r"\(optim.lr 0.0004 -> 0.00044; train.seed 0 -> 3\): choose another --name/--out"):
        prepare_run(dataclasses.replace(changed, train=dataclasses.replace(changed.train, resume=False)))  # (no "resume refused")


def test_a_resume_to_fewer_epochs_than_its_checkpoint_trained_is_refused():
    """--resume --epochs 2 on a run with 3 epochs done (or 2 and some steps of the third) would
    train nothing and leave a config.json that says 2: refused, naming both numbers; the same
    length is fine (Ray's restart of a finished run)."""
    from mtl.engine import check_resumable

    cfg = resolve_config(cfg_with(train={"epochs": 3}))
    state = {"config": cfg.to_dict(), "train_state": {"epoch": 3}, "url": "runs/r/checkpoints/epoch-0003"}
    shorter = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True, epochs=2))
    with pytest.raises(RunConflict, match=r"--epochs 2, but runs/r/checkpoints/epoch-0003 has trained 3 epochs already"):
        check_resumable(state, shorter)
    check_resumable(state, dataclasses.replace(shorter, train=dataclasses.replace(shorter.train, epochs=3)))
    # a step checkpoint inside epoch 3 (or at its end, before its validation): epoch 3 has begun
    inside = {**state, "train_state": {"epoch": 2, "epoch_step": 5}, "url": "runs/r/checkpoints/epoch-0002-step-00000017"}
    with pytest.raises(RunConflict, match=r"--epochs 2, but runs/r/checkpoints/epoch-0002-step-00000017 has trained 2 epochs "
                                          r"and part of epoch 3 already \(--epochs 3 or more continues it\)"):
        check_resumable(inside, shorter)
    check_resumable(inside, dataclasses.replace(shorter, train=dataclasses.replace(shorter.train, epochs=3)))


def test_settings_the_model_cannot_use_are_refused_before_training():
    """Batch 1 per process cannot train ASPP/vortex pooling (their image-pooling branch is
    normalised over the batch); deeplabv3p has no depth branch to configure; vortex rates need
    a vortex module. Each would otherwise fail deep in torch or name a run after a setting
    that changes nothing."""
    with pytest.raises(ValueError, match="--batch-size 1: the aspp context module normalises its image-pooling branch"):
        resolve_config(cfg_with(train={"batch_size": 1}))
    resolve_config(cfg_with(train={"batch_size": 1}, model={"semseg_context": "none", "depth_context": "none"}))
    with pytest.raises(ValueError, match="--arch deeplabv3p has one branch .*--depth-context and --depth-decoder do not apply"):
        resolve_config(cfg_with(model={"arch": "deeplabv3p", "depth_decoder": "double_skip"}))
    with pytest.raises(ValueError, match="--vortex-rates: no context module of --arch branched is vortex pooling"):
        resolve_config(cfg_with(model={"vortex_rates": (1, 2)}))
    resolve_config(cfg_with(model={"arch": "branched_vortex", "vortex_rates": (1, 2)}))


def test_nothing_to_resume_points_at_the_runs_that_differ(tmp_path):
    old = resolve_config(cfg_with(train={"out": str(tmp_path)}))
    RunFolder(f"{tmp_path}/{old.train.name}").write_config(old)
    new = cfg_with(train={"out": str(tmp_path), "resume": True}, optim={"lr": 4.4e-4})
    with pytest.raises(RunConflict, match=rf"nothing to resume at .*Runs of the same architecture there: {old.train.name} "
                                          r"\(differs in optim.lr 0.0004 -> 0.00044\)"):
        prepare_run(new)
    # a setting the run does not use (Adam's run, SGD's momentum): no difference in training, but in the name
    idle = cfg_with(train={"out": str(tmp_path), "resume": True}, optim={"momentum": 0.5})
    with pytest.raises(RunConflict, match=rf"{old.train.name} \(differs in optim.momentum 0.9 -> 0.5 \(unused by it, but part "
                                          r"of its name\)\)"):
        prepare_run(idle)
    shards = resolve_config(cfg_with(train={"out": str(tmp_path)}, data={"shards": str(tmp_path / "s")}))
    RunFolder(f"{tmp_path}/{shards.train.name}").write_config(shards)
    manifest = cfg_with(train={"out": str(tmp_path), "resume": True}, data={"shards": str(tmp_path / "s/manifest.json")})
    with pytest.raises(RunConflict, match=rf"{shards.train.name} \(differs in nothing that changes training: its name came "
                                          r"from another spelling of a path or from --name\)"):
        prepare_run(manifest)  # (the same shard set: its name says --shards <prefix>)


def train_args(tiny_root, out, *extra) -> list[str]:
    return ["--local", "--arch", "deeplabv3p", "--encoder", "resnet18", "--root", tiny_root, "--epochs", "1", "--batch-size", "4",
            "--max-steps-per-epoch", "2", "--workers", "0", "--out", str(out), *extra]


def train_cli(tiny_root, out, *extra, **kw):
    return subprocess.run([sys.executable, "jobs/train.py", *train_args(tiny_root, out, *extra)], cwd=REPO, capture_output=True,
                          text=True, **kw)


def train_main(tiny_root, out, *extra) -> subprocess.CompletedProcess:
    """`train_cli` in this process (`conftest.run_main`)."""
    from conftest import run_main
    from jobs.train import main

    return run_main(main, train_args(tiny_root, out, *extra))


def test_cli_run_writes_config_and_log_and_follows_the_resume_rules(tiny_root, tmp_path):
    r = train_cli(tiny_root, tmp_path, "--log-every", "1", "--log-interval-s", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = os.listdir(tmp_path)
    assert run.startswith("deeplabv3p_resnet18_os16_adam-lr4e-4_w0.5_bs4_e1-")
    saved = json.loads((tmp_path / run / "config.json").read_text())
    assert saved["model"]["output_stride"] == 16 and saved["train"]["name"] == run  # resolved, not null
    assert ExperimentConfig.from_dict(saved).validate() == resolve_config(ExperimentConfig.from_dict(saved))
    # not a terminal: plain progress lines, and train.log holds what was shown
    assert "epoch 1/1 step 1/2 (50%) | loss " in r.stdout and "img/s | lr 0.0004 | elapsed 0:00:" in r.stdout
    log = (tmp_path / run / "train.log").read_text()
    assert "epoch 1/1 step 2/2 (100%)" in log and "validation after epoch 1" in log and "mIoU" in log
    assert f"run folder {tmp_path}/{run}" in log

    again = train_main(tiny_root, tmp_path)  # same configuration, no --resume: refused, nothing touched
    assert again.returncode == 2 and "already holds a run with checkpoints: pass --resume" in again.stderr
    assert "Traceback" not in again.stderr
    other = train_main(tiny_root, tmp_path, "--lr", "4.4e-4", "--name", run, "--resume")
    assert other.returncode == 2 and "resume refused" in other.stderr and "optim.lr 0.0004 -> 0.00044" in other.stderr
    assert sorted(os.listdir(tmp_path)) == [run]
    done = train_main(tiny_root, tmp_path, "--resume")  # finished: it says how to train it longer
    assert done.returncode == 0 and f"to train it longer: --resume --name {run} --epochs N" in done.stdout
    longer = train_cli(tiny_root, tmp_path, "--resume", "--name", run, "--epochs", "2")
    assert longer.returncode == 0, longer.stderr
    assert "resuming with changed train.epochs 1 -> 2" in longer.stdout and ": epoch 1, step 2/4, next LR" in longer.stdout
    assert json.loads((tmp_path / run / "config.json").read_text())["train"]["epochs"] == 2


def test_a_run_whose_data_was_moved_resumes_with_data_moved_only(tiny_root, tmp_path):
    """Checkpoints record where their data was: the same data at another place (a disk replaced,
    a bucket copied) is other data until --data-moved says so. The run's record then follows the
    data: its config.json and checkpoints name the new place, and later resumes need no flag."""
    import shutil

    old, new, runs = tmp_path / "old", tmp_path / "new", tmp_path / "runs"
    shutil.copytree(tiny_root, old)
    assert train_main(str(old), runs, "--name", "run").returncode == 0
    shutil.move(old, new)
    refused = train_main(str(new), runs, "--name", "run", "--resume", "--epochs", "2")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"data.root '{old}' -> '{new}'; if the run's data was moved there, add --data-moved" in refused.stderr
    moved = train_main(str(new), runs, "--name", "run", "--resume", "--epochs", "2", "--data-moved")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"--data-moved: the run goes on with its data at {new} (it trained on {old})" in moved.stdout
    saved = json.loads((runs / "run" / "config.json").read_text())
    assert saved["data"]["root"] == str(new) and saved["train"]["data_moved"] is False
    later = train_main(str(new), runs, "--name", "run", "--resume", "--epochs", "3")
    assert later.returncode == 0 and "--data-moved" not in later.stdout, later.stdout + later.stderr
    unasked = train_main(str(new), runs, "--name", "other", "--data-moved")
    assert unasked.returncode == 2 and "--data-moved continues a run whose data is now elsewhere: give it with --resume" in unasked.stderr
    from mtl.runs import RunConflict, check_same_training  # a folder made shards is other data (another order, other steps)

    stored = ExperimentConfig().with_values({"data.root": str(new)})
    sharded = stored.with_values({"data.root": None, "data.shards": str(tmp_path / "s"), "train.resume": True, "train.data_moved": True})
    with pytest.raises(RunConflict, match=r"data.shards None -> '.*/s'; --data-moved continues on data of the kind the run trained on"):
        check_same_training(stored, sharded, "run x")


def test_a_runs_config_json_continues_it_from_any_folder(tiny_root, tmp_path, monkeypatch):
    """config.json names the run's places absolute (a relative --root meant the folder the run
    started in), without the command's switches: fed back with --config from another folder,
    it continues the run, here after a --data-moved resume recorded the data's new place; from
    where its run folder is now, once that was moved."""
    import shutil

    from conftest import run_main
    from jobs.train import main

    shutil.copytree(tiny_root, tmp_path / "old")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    assert train_main("old", "runs", "--name", "run").returncode == 0
    shutil.move(tmp_path / "old", tmp_path / "new")
    moved = train_main("new", "runs", "--name", "run", "--resume", "--epochs", "2", "--data-moved")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    saved = json.loads((tmp_path / "runs/run/config.json").read_text())
    assert (saved["data"]["root"], saved["train"]["out"]) == (str(tmp_path / "new"), str(tmp_path / "runs"))
    assert saved["train"]["resume"] is False and saved["train"]["data_moved"] is False
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("PWD", str(tmp_path / "elsewhere"))
    later = run_main(main, ["--local", "--config", str(tmp_path / "runs/run/config.json"), "--resume", "--epochs", "3"])
    assert later.returncode == 0, later.stdout + later.stderr
    assert "resumed from" in later.stdout and os.listdir(tmp_path / "elsewhere") == []
    shutil.move(tmp_path / "runs", tmp_path / "archive")  # the run folder moved: its config.json continues it there
    moved = run_main(main, ["--local", "--config", str(tmp_path / "archive/run/config.json"), "--resume", "--epochs", "4"])
    assert moved.returncode == 0 and f"resumed from {tmp_path}/archive/run/checkpoints/epoch-0003" in moved.stdout, moved.stderr


def test_print_config_shows_the_resolved_config_and_starts_nothing(tmp_path):
    r = subprocess.run([sys.executable, "jobs/train.py", "--local", "--arch", "branched_vortex", "--out", str(tmp_path), "--print-config"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout[: r.stdout.index("run folder:")])
    assert printed["model"]["output_stride"] == 8 and printed["model"]["semseg_context"] == "vortex"
    assert f"run folder: {tmp_path}/branched_vortex_resnet34_os8_" in r.stdout
    assert os.listdir(tmp_path) == []


def test_local_mode_refuses_cluster_only_settings():
    r = subprocess.run([sys.executable, "jobs/train.py", "--local", "--num-workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--local trains one process" in r.stderr
    r = subprocess.run([sys.executable, "jobs/train.py", "--local", "--root", "/a", "--shards", "/b"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--root /a and --shards /b both name the training data" in r.stderr


def test_quick_preset_is_small_and_flags_override_it():
    from jobs.train import parse

    _, cfg = parse(["--local", "--quick"])
    assert cfg.data.synthetic_size == (64, 128) and cfg.train.epochs == 4 and cfg.data.synthetic_counts == (160, 48, 48)
    _, cfg = parse(["--local", "--quick", "--epochs", "2", "--batch-size", "4"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.synthetic_size) == (2, 4, (64, 128))
    assert DataConfig() != cfg.data and TrainConfig().epochs == 16 and DistConfig().use_gpu is None and OptimConfig().lr == 4e-4


def test_on_ray_a_relative_input_path_is_refused_before_ray_starts(tmp_path):
    """Ray Train runs every worker in a folder of its own: --root data/x would name nothing there."""
    from mtl.distributed.ray_train import check_worker_paths

    r = subprocess.run([sys.executable, "jobs/train.py", "--root", "data/miniscapes", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --root data/miniscapes is a relative path, which the Ray "
                                                     "workers cannot resolve"), r.stderr
    assert "Ray instance" not in r.stdout + r.stderr and os.listdir(tmp_path) == []  # nothing started, nothing written
    with pytest.raises(ValueError, match="--pretrained weights/r34.pth is a relative path"):
        check_worker_paths(ExperimentConfig(model=ModelConfig(pretrained="weights/r34.pth")))
    for ok in (DataConfig(root="/data/m"), DataConfig(shards="s3://b/shards"), DataConfig(root="file:///data/m")):
        check_worker_paths(ExperimentConfig(data=ok, model=ModelConfig(pretrained="imagenet")))


def test_a_submitted_job_refuses_a_relative_run_folder(monkeypatch):
    """`ray job submit` runs the driver in a temporary copy of --working-dir: a relative --out
    (the default, runs) would put the run there, on the head, gone with the job."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from mtl.distributed.ray_train import SUBMITTED_JOB_ENV, check_worker_paths

    assert SUBMITTED_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR  # what Ray sets in a submitted job's driver
    check_worker_paths(ExperimentConfig())  # from a shell: made absolute from where it runs
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    with pytest.raises(ValueError, match="--out runs is a relative path: a job started by `ray job submit` runs in a temporary"):
        check_worker_paths(ExperimentConfig())
    with pytest.raises(ValueError, match="--baselines runs/seg is a relative path"):
        check_worker_paths(ExperimentConfig(train=TrainConfig(out="s3://b/runs", baselines=("/r/dep", "runs/seg"))))
    check_worker_paths(ExperimentConfig(train=TrainConfig(out="s3://b/runs", baselines=("/r/dep", "s3://b/seg"))))


def test_a_ray_runs_summary_goes_to_the_folder_it_trained_in(tmp_path, monkeypatch):
    """jobs/train.py names the run folder from the config `run_ray` resolved: a relative
    --baselines is part of the run's name only once made absolute."""
    import io

    from rich.console import Console

    import mtl.distributed.ray_train as ray_train
    from jobs.train import run_on_ray
    from mtl.runs import resolve_config, run_url

    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig(train=TrainConfig(out=str(tmp_path / "runs"), baselines=("base/seg", "base/dep")))
    resolved = resolve_config(cfg)
    assert run_url(resolved) != run_url(cfg)
    os.makedirs(run_url(resolved))
    monkeypatch.setattr(ray_train, "run_ray", lambda c, log: (None, resolved))
    assert run_on_ray(cfg, Console(file=io.StringIO())) == 0
    assert json.loads(open(f"{run_url(resolved)}/summary.json").read())["run"] == run_url(resolved)


def test_sigterm_ends_a_driver_on_ray_at_once_as_stopped():
    """``ray job stop`` sends the driver SIGTERM, then SIGKILL 3 s later: the driver ends at once
    with `Stopped` (`jobs/train.py`: exit 143, "--resume continues"), not with Ray's stack dump,
    and the handler before the run is back after it, whether it was stopped or not. (Ray's
    trainer stood in for: its ``fit`` waits on the controller.)"""
    import signal

    from mtl.distributed.ray_train import _fit
    from mtl.engine import Stopped

    class Stopping:
        def fit(self) -> str:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            except KeyboardInterrupt:  # (as Ray's wait turns what a signal handler raised into)
                raise KeyboardInterrupt() from None
            return "not stopped"

    class Finishing:
        def fit(self) -> str:
            return "result"

    def mine(signum, frame) -> None:
        raise AssertionError("the handler before the run was called")

    before = signal.signal(signal.SIGTERM, mine)
    try:
        t0 = time.monotonic()
        with pytest.raises(Stopped):
            _fit(Stopping())
        assert time.monotonic() - t0 < 10 and signal.getsignal(signal.SIGTERM) is mine
        assert _fit(Finishing()) == "result" and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("flag", ["--root", "--shards", "--out"])
def test_an_unreachable_storage_endpoint_is_one_line_naming_the_url(flag, tmp_path):
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "2", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y"}
    args = [flag, "s3://streetmtl/nowhere"] + ([] if flag == "--out" else ["--out", str(tmp_path)])
    r = subprocess.run([sys.executable, "jobs/train.py", "--local", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach s3://streetmtl/nowhere") and "at endpoint http://127.0.0.1:9" in line
    assert "(gave up after 2 attempts in " in line and "AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, now legacy, set the retries)" in line


def test_an_elastic_run_needs_step_checkpoints():
    """Ray grows an elastic group back by restarting it from the last checkpoint: with epoch
    checkpoints only, every node that returns would cost up to an epoch of training."""
    elastic = cfg_with(dist={"num_workers": 2, "min_workers": 1})
    with pytest.raises(ValueError, match="--min-workers 1: an elastic run restarts its workers .* --checkpoint-every-min M"):
        elastic.validate()
    dataclasses.replace(elastic, train=dataclasses.replace(elastic.train, checkpoint_every_min=5.0)).validate()
    dataclasses.replace(elastic, train=dataclasses.replace(elastic.train, checkpoint_every=50)).validate()


def test_a_remote_train_log_is_rewritten_while_training_goes_on(s3_prefix, monkeypatch):
    """On an object store train.log is rewritten whole: at an epoch's end on the log's own thread
    (``flush(wait=False)``), at the run's end waiting, after the writes handed over before (an
    older text never lands last). A background write's failure is raised by the next flush."""
    import threading
    from concurrent import futures

    import mtl.progress as progress
    from mtl.progress import RunLog
    from mtl.storage import read_bytes

    url, put = f"{s3_prefix}/run/train.log", progress.write_bytes_atomic
    started, gates, calls, done = threading.Event(), [threading.Event(), None, threading.Event(), None], [], []

    def held(target: str, data: bytes) -> None:
        calls.append(data.decode().count("\n"))
        call = len(calls)
        started.set()
        gate = gates[call - 1]
        assert gate is None or gate.wait(30)
        if call == 2:
            raise OSError("the store refused train.log")
        put(target, data)
        done.append(call)

    def lines() -> list[str]:
        return [line.split(" ", 2)[2] for line in read_bytes(url).decode().splitlines()]

    monkeypatch.setattr(progress, "write_bytes_atomic", held)
    log = RunLog(url, echo=False)
    log("epoch 1 done")
    log.flush(wait=False)  # returns while the write waits
    assert started.wait(30) and calls == [1] and read_bytes(url) is None
    gates[0].set()
    log("epoch 2 done")
    log.flush(wait=False)  # (the store refuses this one)
    futures.wait([log._written], timeout=30)
    log("epoch 3 done")
    with pytest.raises(OSError, match="the store refused train.log"):
        log.flush(wait=False)
    assert lines() == ["epoch 1 done"]
    log.flush(wait=False)  # epochs 1-3: held until after the run's end began waiting for it
    log("the end")
    threading.Timer(0.5, gates[2].set).start()
    log.flush()
    deadline = time.time() + 30
    while len(done) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert done == [1, 3, 4] and lines() == ["epoch 1 done", "epoch 2 done", "epoch 3 done", "the end"]
