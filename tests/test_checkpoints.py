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
