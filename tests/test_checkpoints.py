"""Checkpoints hold tensors and plain data only: a file that carries code is refused, not run."""

import os
import subprocess
import sys

import pytest
import torch

from mtl.checkpoint import FORMAT, checkpoint_bytes, load_checkpoint, rng_state, set_rng_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    """Unpickling this calls os.system: what a planted checkpoint in a shared bucket would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "config": {}, "payload": RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match=r"checkpoint .*evil.pt holds Python objects besides tensors and plain data; refused"):
        load_checkpoint(str(path))
    r = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "refused, since loading it could run code" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_deepspeed_files_are_read_safely_too(tmp_path):
    from mtl.distributed.deepspeed_strategy import safe_deepspeed_load

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": RunsCode(str(marker))}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt holds Python objects"):
        safe_deepspeed_load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()


def test_rng_state_survives_a_safe_round_trip(tmp_path):
    import random

    import numpy as np

    (tmp_path / "c.pt").write_bytes(checkpoint_bytes({"rng": rng_state()}))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(str(tmp_path / "c.pt"))["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Before the RNG state was stored as tensors, numpy's was pickled as numpy's own tuple."""
    import numpy as np

    state = {**rng_state(), "numpy": np.random.get_state()}
    torch.save({"format": FORMAT, "rng": state, "model": {}}, tmp_path / "old.pt")
    expected = np.random.rand(3)
    set_rng_state(load_checkpoint(str(tmp_path / "old.pt"))["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_a_ray_run_folder_opens_at_its_latest_checkpoint(tmp_path):
    """Local runs keep checkpoints/latest.json; Ray runs epoch-NNNN/state.pt (DDP) or only
    final.pt/best.pt with model weights (DeepSpeed): each opens by its run folder."""
    from mtl.checkpoint import checkpoint_in_folder

    for epoch in (1, 2):
        (tmp_path / "ddp" / f"epoch-000{epoch}").mkdir(parents=True)
        (tmp_path / "ddp" / f"epoch-000{epoch}" / "state.pt").write_bytes(checkpoint_bytes({"epoch": epoch}))
    assert load_checkpoint(str(tmp_path / "ddp"))["epoch"] == 2
    (tmp_path / "ds" / "epoch-0001").mkdir(parents=True)
    (tmp_path / "ds" / "best.pt").write_bytes(checkpoint_bytes({"epoch": 1}))
    assert checkpoint_in_folder(str(tmp_path / "ds")).endswith("ds/best.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty \(looked for checkpoints/latest.json, epoch-NNNN/state.pt"):
        load_checkpoint(str(tmp_path / "empty"))


DEEPSPEED_RESUME = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
from mtl.config import DistConfig, ExperimentConfig, ModelConfig, TrainConfig
from mtl.distributed.deepspeed_strategy import DeepSpeedStrategy, safe_deepspeed_load
from mtl.engine import build_optimizer
from mtl.models import build_model
cfg = ExperimentConfig(model=ModelConfig(arch="deeplabv3p", encoder="resnet18"), train=TrainConfig(batch_size=2),
                       dist=DistConfig(strategy="deepspeed", zero_stage=2))
def strategy():
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    return DeepSpeedStrategy(model, build_optimizer(model, cfg), cfg)
if sys.argv[3] == "save":
    s = strategy()
    assert s.engine.checkpoint_engine.load is safe_deepspeed_load  # every file DeepSpeed reads goes through it
    s.save_dir(sys.argv[1], {"epoch": 1, "step": 2, "config": cfg.to_dict()}, 0)
print("restored epoch", strategy().load_dir(sys.argv[1], lambda meta: None)["epoch"])
"""


@pytest.mark.slow
def test_deepspeed_resumes_through_the_safe_reader_and_refuses_a_planted_file(tmp_path, free_port):
    """The real DeepSpeed engine (ZeRO-2) saves, then loads through `safe_deepspeed_load`; a file
    of its checkpoint replaced by one carrying code is refused, and the code never runs."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    ckpt.mkdir()
    run = lambda mode: subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(ckpt), str(free_port()), mode],  # noqa: E731
                                      cwd=REPO, capture_output=True, text=True, timeout=600)
    r = run("save")
    assert r.returncode == 0 and "restored epoch 1" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    (optim,) = ckpt.glob("deepspeed/*optim_states.pt")
    torch.save({"optimizer_state_dict": RunsCode(str(marker))}, optim)
    r = run("load")
    assert r.returncode != 0 and f"checkpoint {optim} holds Python objects besides tensors and plain data; refused" in r.stderr
    assert not marker.exists()
