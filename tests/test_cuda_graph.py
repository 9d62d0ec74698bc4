"""The captured train step's logic, on the CPU: warm-up, static buffers, the LR tensor, batches
that do not fit, a failed capture, the choice of step per --cuda-graph.

A CPU has no CUDA graphs, so `rerun_capture` stands in for `mtl.cuda_graph.cuda_capture`: like
a capture it runs nothing when called, and its "replay" runs the captured function again on the
same static input buffers and writes into the same output tensors. What only a GPU can show (the
captured kernels give the eager step's losses and weights, a resume) is in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from mtl.config import DistConfig, ExperimentConfig, ModelConfig, TrainConfig
from mtl.cuda_graph import CapturedStep, prepare_optimizer
from mtl.engine import autocast, build_optimizer, make_step
from mtl.losses import DepthCodec
from mtl.models import build_model
from mtl.schedule import PolyLR
from mtl.strategy import PlainStrategy

CPU = torch.device("cpu")


def rerun_capture(fn, device):
    out: dict[str, torch.Tensor] = {}

    def replay() -> None:
        new = fn()
        if not out:
            out.update({k: v.clone() for k, v in new.items()})
        for k, v in new.items():
            out[k].copy_(v)

    return replay, out


def batch(seed: int, n: int = 2, h: int = 32, w: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(n, 3, h, w, generator=g).contiguous(memory_format=torch.channels_last),
            "semseg": torch.randint(0, 19, (n, h, w), generator=g), "depth": torch.rand(n, h, w, generator=g) * 50 + 4,
            "valid": torch.rand(n, h, w, generator=g) > 0.2, "index": torch.arange(n)}


def strategy_and_eager(cfg: ExperimentConfig):
    torch.manual_seed(0)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    strategy = PlainStrategy(model, build_optimizer(model, cfg))
    off = ExperimentConfig(model=cfg.model, optim=cfg.optim, train=TrainConfig(cuda_graph="off"))
    return strategy, make_step(off, strategy, DepthCodec("log"), autocast(CPU, False), CPU)


CFG = ExperimentConfig(model=ModelConfig(arch="deeplabv3p", encoder="resnet18"))


def test_a_captured_step_trains_exactly_like_the_eager_step():
    """Warm-up steps run eagerly, then the eager function is captured once and replayed on the
    batch copied into its static buffers; the LR plan reaches the captured update through the
    LR tensor, filled in place. Same losses and weights as the eager loop, step by step (whose LR
    is a tensor too: a float32 LR rounds differently from the double an eager update uses)."""
    plan = PolyLR(1e-3, 6, warmup_steps=2)
    ref, ref_step = strategy_and_eager(CFG)
    prepare_optimizer(ref.optimizer, CPU)
    cap, eager = strategy_and_eager(CFG)
    prepare_optimizer(cap.optimizer, CPU)  # (else the eager warm-up steps would use the double)
    logs: list[str] = []
    step = CapturedStep(eager, cap.optimizer, CPU, warmup=2, capture=rerun_capture, log=logs.append)
    outs = []
    for i in range(6):
        plan.apply(ref.optimizer, i)
        lr = plan.apply(cap.optimizer, i)
        want, got = ref_step(batch(i)), step(batch(i))
        outs.append(got)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7), (i, k, float(got[k] - want[k]))
        if i >= 2:  # captured: the optimizer reads its LR from a tensor the plan fills
            assert all(isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == pytest.approx(lr) for g in cap.optimizer.param_groups)
    for a, b in zip(ref.module.state_dict().values(), cap.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)
    assert step.state() == {"captured": True, "failed": False, "eager_steps": 2, "replays": 4}
    assert outs[3] is outs[5] and outs[2] is outs[5]  # the graph's static outputs, read before the next step
    assert logs == ["train step captured as a CUDA graph after 2 eager steps; replayed from now on"]


def test_the_checkpoint_stores_the_lr_as_a_number():
    """A captured step's LR lives in a tensor; checkpoints keep the plain number, so eager and
    captured runs write (and resume) the same files."""
    strategy, _ = strategy_and_eager(CFG)
    prepare_optimizer(strategy.optimizer, CPU)
    PolyLR(2e-4, 10).apply(strategy.optimizer, 0)
    groups = strategy.state_dict()["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(2e-4) for g in groups)
    assert isinstance(strategy.optimizer.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps its tensor


def test_a_batch_that_does_not_fit_runs_eagerly_but_not_under_ddp():
    _, eager = strategy_and_eager(CFG)
    cap, _ = strategy_and_eager(CFG)
    step = CapturedStep(eager, cap.optimizer, CPU, warmup=1, capture=rerun_capture, log=lambda m: None)
    for i in range(3):
        step(batch(i))
    step(batch(9, n=3))  # a batch of another size: eager, the graph stays
    assert step.state() == {"captured": True, "failed": False, "eager_steps": 2, "replays": 2}
    ddp_like = CapturedStep(eager, cap.optimizer, CPU, warmup=1, capture=rerun_capture, log=lambda m: None, agree=lambda ok: ok)
    for i in range(2):
        ddp_like(batch(i))
    with pytest.raises(RuntimeError, match="does not fit the captured train step"):
        ddp_like(batch(9, n=3))


def test_a_failed_capture_is_raised_when_strict_else_reported_and_eager_goes_on():
    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    strategy, eager = strategy_and_eager(CFG)
    strict = CapturedStep(eager, strategy.optimizer, CPU, warmup=1, capture=broken, strict=True)
    strict(batch(0))
    with pytest.raises(RuntimeError, match="CUDA graph failed .*not permitted.*--cuda-graph off"):
        strict(batch(1))
    logs: list[str] = []
    lenient = CapturedStep(eager, strategy.optimizer, CPU, warmup=1, capture=broken, log=logs.append)
    before = [p.detach().clone() for p in strategy.module.parameters()]
    for i in range(3):
        out = lenient(batch(i))
        assert torch.isfinite(out["loss"])
    assert lenient.state() == {"captured": False, "failed": True, "eager_steps": 3, "replays": 0}
    assert len(logs) == 1 and "CUDA graph failed (RuntimeError: operation not permitted" in logs[0] and "--cuda-graph off" in logs[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, strategy.module.parameters()))
    with pytest.raises(ValueError, match="--grad-accum 1"):
        lenient(batch(0), last_micro_batch=False)


def test_a_failed_capture_that_leaves_the_allocator_capturing_stops_the_run(monkeypatch):
    """torch releases without pytorch#180395 (2.11 among them) leave the CUDA allocator capturing
    after a capture whose end raised: eager steps would never free a prefetched batch, and run
    out of memory thousands of steps later. The allocator's own check (`empty_cache`'s
    assertion) tells; then even auto stops at once, saying what to pass."""
    import mtl.cuda_graph

    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(mtl.cuda_graph, "allocator_left_capturing",
                        lambda: "captures_underway.empty() INTERNAL ASSERT FAILED")
    strategy, eager = strategy_and_eager(CFG)
    step = CapturedStep(eager, strategy.optimizer, CPU, warmup=1, capture=broken, log=lambda m: None)
    step(batch(0))
    with pytest.raises(RuntimeError, match=r"CUDA graph failed .*not permitted.*; torch .* leaves its memory allocator "
                                           r"capturing after that \(pytorch#180395: captures_underway.empty\(\) INTERNAL "
                                           r"ASSERT FAILED\), .*--cuda-graph off trains with the eager step from the start"):
        step(batch(1))


def test_ranks_go_on_only_together_and_a_replaced_lr_is_refused():
    """Several ranks agree on the capture (one all-reduce): if any rank's capture failed, every
    rank raises, even under auto (a rank running eagerly beside ranks replaying their captured
    all-reduce would hang the group). After the capture, an optimizer whose LR tensor was
    replaced (a later load_state_dict) is refused: the graph would keep reading the old one."""
    def broken(fn, device):
        raise RuntimeError("out of memory")

    _, eager = strategy_and_eager(CFG)
    cap, _ = strategy_and_eager(CFG)
    failed_here = CapturedStep(eager, cap.optimizer, CPU, warmup=1, capture=broken, agree=lambda ok: ok)
    failed_here(batch(0))
    with pytest.raises(RuntimeError, match="CUDA graph failed .*out of memory.*--cuda-graph off"):
        failed_here(batch(1))
    failed_elsewhere = CapturedStep(eager, cap.optimizer, CPU, warmup=1, capture=rerun_capture, agree=lambda ok: False)
    failed_elsewhere(batch(0))
    with pytest.raises(RuntimeError, match="another rank's capture failed") as elsewhere:
        failed_elsewhere(batch(1))
    from mtl.distributed.ray_train import first_cause  # what the launcher reports: the rank that says why

    assert first_cause({0: elsewhere.value, 1: RuntimeError("capture: operation not permitted"), 2: elsewhere.value}) == 1
    assert first_cause({0: RuntimeError("x"), 3: RuntimeError("y")}) == 0 and first_cause({}) == 0

    step = CapturedStep(eager, cap.optimizer, CPU, warmup=1, capture=rerun_capture, log=lambda m: None)
    for i in range(3):
        step(batch(i))
    cap.optimizer.load_state_dict(cap.state_dict()["optimizer"])  # LR back to a float, groups rebuilt
    with pytest.raises(RuntimeError, match="LR tensors were replaced after the train step was captured"):
        step(batch(3))
    assert cap.state_dict()["optimizer"]["param_groups"][0]["capturable"] is False  # as an eager run stores it


def test_cuda_graph_flag_picks_the_step():
    """auto: captured where it can be (a GPU, one process or DDP, --grad-accum 1), else eager;
    on: captured or an error that says why; --grad-accum > 1 with on is refused up front."""
    strategy, _ = strategy_and_eager(CFG)
    codec, amp = DepthCodec("log"), autocast(CPU, False)
    auto = make_step(CFG, strategy, codec, amp, CPU)
    assert not isinstance(auto, CapturedStep)  # the CPU: eager, and nothing to say about it
    with pytest.raises(ValueError, match="--cuda-graph on: a CUDA graph needs a GPU"):
        make_step(ExperimentConfig(model=CFG.model, train=TrainConfig(cuda_graph="on")), strategy, codec, amp, CPU)
    with pytest.raises(ValueError, match="--cuda-graph on: .* --grad-accum 1"):
        ExperimentConfig(train=TrainConfig(cuda_graph="on", grad_accum=2)).validate()
    with pytest.raises(ValueError, match="--cuda-graph on: DeepSpeed"):
        ExperimentConfig(train=TrainConfig(cuda_graph="on"), dist=DistConfig(strategy="deepspeed")).validate()
