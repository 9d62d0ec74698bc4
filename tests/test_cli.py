"""The command lines (mtl.cli over tyro): help from the config's comments and choices from the
registries, config files with flags on top, a run's config.json fed back, HxW sizes, and bad
flags as one usage line naming the flag."""

import dataclasses
import json
import os
import subprocess
import sys
from typing import Literal

import pytest

from jobs.evaluate import EvaluateCommand
from jobs.train import parse
from mtl.cli import parse as parse_command
from mtl.config import ExperimentConfig
from mtl.models import ARCHITECTURES, CONTEXTS, DECODERS, ENCODERS
from mtl.models.registry import Registry, register
from mtl.runs import resolve_config, run_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _help(capsys, monkeypatch, argv=("--help",)) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside tyro's boxes
    with pytest.raises(SystemExit) as e:
        parse(list(argv))
    assert e.value.code == 0
    return capsys.readouterr().out


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    usage, error = err.strip().splitlines()  # argparse's two lines: usage, then the error
    assert usage.startswith("usage: ") and ": error: " in error
    return error


def test_help_shows_the_field_comments_and_the_registries_choices(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    assert "peak learning rate" in text and "loss = w * cross-entropy + (1 - w) * depth loss" in text
    assert "DATACONFIG" not in text and "--lr FLOAT" in text and "--batch-size INT" in text
    for flag, names in (("--arch", ARCHITECTURES.names), ("--encoder", ENCODERS.names), ("--semseg-context", CONTEXTS.names),
                        ("--depth-decoder", DECODERS.names), ("--device", ("auto", "cpu", "cuda")),
                        ("--optimizer", ("adam", "sgd")), ("--strategy", ("ddp", "deepspeed")), ("--depth-space", ("log", "linear"))):
        assert f"{flag} {{{','.join(names)}}}" in text, flag
    for flag in ("--synthetic-size HxW", "--crop HxW", "--use-gpu, --no-use-gpu", "--hflip, --no-hflip", "--config STR", "--quick"):
        assert flag in text, flag


def test_the_registries_hold_exactly_the_listed_names():
    for table in (ARCHITECTURES, ENCODERS, CONTEXTS, DECODERS):
        assert tuple(table) and set(table) == set(table.names)
    table = Registry("architecture", Literal["listed"])
    register(table, "listed")(object)
    with pytest.raises(KeyError, match="'mine' is not listed in mtl.zoo_names"):
        register(table, "mine")(object)
    with pytest.raises(KeyError, match="registered twice"):
        register(table, "listed")(object)


def test_flags_keep_their_names_and_sizes_are_hxw():
    _, cfg = parse(["--lr", "1e-3", "--batch-size", "4", "--epochs", "2", "--arch", "branched", "--no-hflip", "--num-workers", "3",
                    "--synthetic-size", "64x128", "--crop", "48x96", "--no-use-gpu", "--aspp-rates", "3", "6", "9"])
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.epochs, cfg.model.arch) == (1e-3, 4, 2, "branched")
    assert (cfg.data.hflip, cfg.dist.num_workers, cfg.dist.use_gpu, cfg.model.aspp_rates) == (False, 3, False, (3, 6, 9))
    assert (cfg.data.synthetic_size, cfg.data.crop) == ((64, 128), (48, 96))
    assert parse([])[1] == ExperimentConfig()  # nothing given: the defaults, None left None (use_gpu, crop, workers...)
    assert parse(["--use-gpu"])[1].dist.use_gpu is True


@pytest.mark.parametrize("argv, message", [
    (["--arch", "nope"], "--arch must be one of deeplabv3p, branched, distillation, branched_vortex; got 'nope'"),
    (["--output-stride", "7"], "--output-stride must be one of 8, 16, 32; got '7'"),
    (["--lr", "abc"], "--lr: could not convert string to float: 'abc'"),
    (["--crop", "48by96"], "--crop must be HxW"),
    (["--synthetic-size", "64", "128"], "unrecognized arguments: 128"),  # the old two-number form
    (["--semseg-weight", "1.5"], "--semseg-weight must lie in [0, 1], got 1.5"),  # ExperimentConfig.validate
    (["--local", "--num-workers", "2"], "--local trains one process"),
    (["--local", "--address", "10.0.0.1:6379", "--max-failures=7"],
     "--local trains in this process, without Ray: --address, --max-failures are for a run on Ray (drop --local, or them)"),
    (["--local", "--no-use-gpu"], "--use-gpu is for a run on Ray (drop --local, or it; in this process --device cpu or cuda chooses)"),
    (["--synthetic-size", "8x8"], "--synthetic-size must be at least 16x16, got 8x8"),
    # a setting of a method the run does not use would be ignored without a word
    (["--momentum", "0.5"], "--momentum 0.5 changes nothing in this run: it is SGD's (--optimizer sgd); leave it out"),
    (["--tasks", "depth", "--semseg-weight", "0.3"], "--semseg-weight 0.3 changes nothing in this run: it weighs two tasks' losses"),
    (["--no-augment", "--no-hflip"], "--no-hflip changes nothing in this run: it is the augmentation's, which --no-augment turns"),
    (["--quick", "--config", "x.json"], "--config and --quick both give a starting configuration"),
    (["--epochs"], "--epochs expects a value"),
    (["--synthetic-counts", "1", "1"], "--synthetic-counts expects 3 values (INT INT INT)"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be >= 1 (or not given), got 0"),
    (["--keep-last", "-1"], "--keep-last must be >= 0 (0: all), got -1"),
    (["--seed", "-3"], "--seed must be >= 0, got -3"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0 and finite (0 or not given: no clipping), got -1.0"),
    (["--poly-power", "-0.5"], "--poly-power must be >= 0 and finite, got -0.5"),
    (["--optimizer", "sgd", "--momentum", "1"], "--momentum must lie in [0, 1), got 1.0"),
    (["--task-weighting", "uncertainty", "--semseg-weight", "1"], "--task-weighting uncertainty starts from --semseg-weight"),
    (["--num-workers", "2", "--gpus-per-worker", "0.5"], "ranks of one run may land on one GPU, which NCCL refuses"),
    (["--gpus-per-worker", "2"], "a training process uses one GPU"),
    (["--prefetch", "0"], "--prefetch must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # (each flag on its own, with its value)
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0, got nan"),
    (["--checkpoint-every-min", "-2"], "--checkpoint-every-min must be >= 0 (0: never), got -2"),
    (["--max-failures", "-2"], "--max-failures >= 0, or -1 for no limit"),
    (["--synthetic-counts", "8", "0", "2"], "--synthetic-counts at least 1 1 0, got 4, 256 and 8 0 2"),
    (["--name", "../elsewhere"], "--name '../elsewhere' must be a folder name"),
    (["--root", ""], "--root '' names no data (an unset variable?)"),  # (it trained on the synthetic set)
    (["--out", ""], "--out '' names no folder (an unset variable?)"),
    # fsspec would read them as a pattern (on S3 a keep-last deletion matched another run's files) or a URL chain
    (["--name", "run[ab]"], "--name 'run[ab]': '[', ']' cannot be in the path of a run's files"),
    (["--out", "s3://bucket/exp::2"], "--out 's3://bucket/exp::2': '::' cannot be in the path of a run's files"),
])
def test_a_bad_flag_is_one_usage_line_naming_it(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


def test_a_config_file_is_the_starting_point_and_flags_override_it(tmp_path, capsys):
    f = tmp_path / "exp.json"
    f.write_text(json.dumps({"model": {"arch": "branched"}, "optim": {"lr": 1e-3}, "data": {"crop": [48, 96]}}))
    _, cfg = parse(["--config", str(f), "--lr", "2e-3"])
    assert (cfg.model.arch, cfg.optim.lr, cfg.data.crop, cfg.train.epochs) == ("branched", 2e-3, (48, 96), 16)
    y = tmp_path / "exp.yaml"
    y.write_text("model:\n  arch: distillation\ntrain:\n  epochs: 3\n")
    _, cfg = parse(["--config", str(y), "--epochs", "5"])
    assert (cfg.model.arch, cfg.train.epochs) == ("distillation", 5)
    f.write_text(json.dumps({"model": {"arch": "zzz"}}))
    assert f"--config {f}: not a valid streetmtl config: --arch must be one of" in _usage_error(capsys, ["--config", str(f)])
    f.write_text(json.dumps({"modle": {}}))
    assert "unknown config keys" in _usage_error(capsys, ["--config", str(f)])
    # a file has no parser in front of it: a value of the wrong type names its flag instead of
    # training something else ("false" is true, "depth" is two letters short of both tasks)
    for part, values, said in (("optim", {"tasks": "depth"}, "--tasks must be a list"),
                               ("data", {"hflip": "false"}, "--hflip must be true or false, got 'false'"),
                               ("train", {"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
                               ("train", {"baselines": "runs/a"}, "--baselines must be a list"),
                               ("model", {"aspp_rates": [6.5, 12]}, "--aspp-rates must be an integer, got 6.5"),
                               ("data", {"synthetic_size": "64x128"}, "--synthetic-size must be a list of 2 values"),
                               ("train", {"seed": True}, "--seed must be an integer, got True")):
        f.write_text(json.dumps({part: values}))
        assert said in _usage_error(capsys, ["--config", str(f)]), said
    # numbers as a flag gives them: an int where a float goes (the same run, by name and hash), YAML 1.1's "1e-3"
    y.write_text("optim:\n  lr: 1e-3\n  weight_decay: 0\n")
    _, from_file = parse(["--config", str(y)])
    assert (from_file.optim.lr, type(from_file.optim.weight_decay)) == (1e-3, float)
    assert run_name(from_file) == run_name(parse(["--lr", "1e-3", "--weight-decay", "0"])[1])
    assert "no such file" in _usage_error(capsys, ["--config", str(tmp_path / "none.json")])
    # a file's setting of a method the run does not use is refused as its flag would be (it would be
    # ignored, and name another run); the method's flag, its default, or a resume (an earlier
    # version's run named by it) take it
    f.write_text(json.dumps({"optim": {"momentum": 0.5}, "data": {"augment": False, "hflip": False}}))
    assert (f"--momentum 0.5 (from --config {f}) changes nothing in this run: it is SGD's (--optimizer sgd); give --momentum 0.9 "
            "(its default) or remove it from the file") in _usage_error(capsys, ["--config", str(f)])
    assert "--no-hflip (from --config" in _usage_error(capsys, ["--config", str(f), "--optimizer", "sgd"])
    assert parse(["--config", str(f), "--optimizer", "sgd", "--augment"])[1].optim.momentum == 0.5
    assert parse(["--config", str(f), "--momentum", "0.9", "--hflip"])[1].optim.momentum == 0.9
    assert parse(["--config", str(f), "--resume"])[1].optim.momentum == 0.5


def test_a_runs_config_json_fed_back_is_the_same_run(tmp_path):
    _, cfg = parse(["--arch", "branched", "--lr", "3e-4", "--synthetic-size", "64x128", "--out", str(tmp_path)])
    saved = resolve_config(cfg)  # what the run folder's config.json holds
    path = tmp_path / "config.json"
    path.write_text(saved.to_json())
    _, again = parse(["--config", str(path)])
    assert resolve_config(again) == saved and run_name(again) == saved.train.name
    _, resumed = parse(["--config", str(path), "--resume", "--workers", "3"])  # operational flags may differ
    assert run_name(resumed) == saved.train.name and resumed.train.resume
    _, other = parse(["--config", str(path), "--lr", "1e-3"])  # another recipe: another run, not the old folder
    assert run_name(other) != saved.train.name and "lr1e-3" in run_name(other)
    # another architecture or output stride from the file gets its own defaults, as without the file
    _, vortex = parse(["--config", str(path), "--arch", "branched_vortex"])
    assert resolve_config(vortex).model == resolve_config(parse(["--arch", "branched_vortex"])[1]).model
    _, os8 = parse(["--config", str(path), "--output-stride", "8"])
    assert resolve_config(os8).model.aspp_rates == (12, 24, 36)
    assert resolve_config(parse(["--config", str(path), "--arch", "deeplabv3p"])[1]).model.depth_context is None
    # whether to resume is the command's flag: a resumed run's file neither resumes by itself nor
    # makes a new run's start fail with "nothing to resume"
    path.write_text(resumed.to_json())
    _, started = parse(["--config", str(path), "--lr", "1e-3"])
    assert not started.train.resume and not parse(["--config", str(path)])[1].train.resume
    named = resolve_config(parse(["--name", "mine", "--out", str(tmp_path)])[1])
    path.write_text(named.to_json())
    assert run_name(parse(["--config", str(path)])[1]) == "mine"  # a chosen name stays for the same run
    assert run_name(parse(["--config", str(path), "--resume", "--lr", "1e-3"])[1]) == "mine"  # (refused there, naming --lr)
    assert run_name(parse(["--config", str(path), "--name", "mine", "--lr", "1e-3"])[1]) == "mine"
    # but another recipe from its file is a new run with a name of its own, as from a derived name's
    # file: the old folder would refuse it (so would a run trained longer, whose name says fewer epochs)
    assert "lr1e-3" in run_name(parse(["--config", str(path), "--lr", "1e-3"])[1])
    longer = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=saved.train.epochs + 2))
    path.write_text(longer.to_json())
    assert run_name(parse(["--config", str(path), "--resume"])[1]) == saved.train.name
    assert "lr1e-3" in run_name(parse(["--config", str(path), "--lr", "1e-3"])[1])


def test_quick_preset_is_overridden_by_flags():
    _, cfg = parse(["--quick", "--epochs", "2"])
    assert cfg.data.synthetic_size == (64, 128) and cfg.train.epochs == 2 and cfg.train.batch_size == 8


def test_data_flags_have_the_same_names_in_every_tool(capsys):
    for flag in ("--root", "--shards", "--data"):
        a = parse_command(EvaluateCommand, ["--checkpoint", "c", flag, "/d"])
        assert a.data == "/d"
    with pytest.raises(SystemExit):
        parse_command(EvaluateCommand, ["--split", "val"])
    assert "the following arguments are required: --checkpoint" in capsys.readouterr().err


def test_cli_from_a_shell(tmp_path):
    """As a user runs it: the print-config path with a config file, and a bad flag's two lines."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"arch": "branched_vortex"}}))
    r = subprocess.run([sys.executable, "jobs/train.py", "--config", str(cfg), "--out", str(tmp_path), "--local", "--print-config"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"run folder: {tmp_path}/branched_vortex_resnet34_os8_" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_prep.synthesize", "--out", str(tmp_path / "x"), "--size", "64"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "synthesize.py: error: --size must be HxW with integers of at least 8 (e.g. 256x512), got '64'")


CORE_ONLY = """
import runpy, sys
sys.modules.update(ray=None, s3fs=None)  # the core install: neither is there (an import of either fails)
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script,args,said", [
    ("jobs/train.py", ["--quick"], "training without --local (add it to train in this process) runs on Ray, which is not "
                                   "installed here: pip install -e '.[cluster]' -c constraints.txt installs it"),
    ("jobs/tune.py", ["--epochs", "1"], "a sweep runs on Ray, which is not installed here"),
    ("jobs/train.py", ["--local", "--quick", "--root", "s3://bucket/miniscapes"],
     "s3://bucket/miniscapes: the storage client for s3:// is not installed: Install s3fs to access S3 "
     "(pip install -e '.[cluster]' -c constraints.txt installs s3fs)"),
    ("jobs/evaluate.py", ["--checkpoint", "s3://bucket/runs/a/best.pt"], "the storage client for s3:// is not installed"),
], ids=["train-on-ray", "sweep", "train-s3-data", "evaluate-s3-checkpoint"])
def test_on_the_core_install_what_needs_the_cluster_install_says_so(tmp_path, script, args, said):
    """Without Ray and s3fs (`pip install -e .`), a command that needs them is one line naming
    the install, not an import traceback; nothing is written."""
    out = ["--out", str(tmp_path / "runs")] if script != "jobs/evaluate.py" else []
    r = subprocess.run([sys.executable, "-c", CORE_ONLY, script, *args, *out], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # (no run folder in it)


def test_a_setting_of_a_method_the_run_does_not_use_is_no_difference_and_keeps_old_runs_names():
    """SGD's momentum under Adam, DWA's temperature under fixed weights, the loss weight of one
    task...: another value trains the same, so a resume is not refused over it; a new run refuses
    it as a flag (`test_a_bad_flag_is_one_usage_line_naming_it`), a resume of a run an earlier
    version named with it takes it (the name, a hash of the fields, is kept)."""
    from mtl.runs import config_diff, idle_fields

    base = ExperimentConfig()
    same = base.with_values({"optim.momentum": 0.5, "optim.dwa_temperature": 3.0, "optim.weighting_lr": 0.1,
                             "dist.zero_stage": 2, "data.shuffle_buffer": 0})
    assert not config_diff(base, same) and run_name(resolve_config(same)) != run_name(resolve_config(base))
    one = base.with_values({"optim.tasks": ("depth",)})
    assert not config_diff(one, one.with_values({"optim.semseg_weight": 0.3}))
    sgd = base.with_values({"optim.optimizer": "sgd"})
    assert config_diff(sgd, sgd.with_values({"optim.momentum": 0.5})) == ["optim.momentum 0.9 -> 0.5"]
    assert "optim.momentum" not in idle_fields(sgd) and "optim.dwa_temperature" in idle_fields(sgd)
    assert parse(["--resume", "--momentum", "0.5"])[1].optim.momentum == 0.5  # (an old run named with it)
