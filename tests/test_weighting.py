"""Task weighting (--task-weighting), single-task baselines (--tasks) and Δm.

Each method's weights move the way its paper says, on hand-made losses; each trains inside the
Trainer on the CPU and resumes exactly (its state is in the checkpoint); Δm from hand-made run
folders matches a hand computation.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mtl.checkpoint import CheckpointIndex
from mtl.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from mtl.engine import fit, local_runtime
from mtl.multitask import delta_m, read_baselines, selection_score, task_metrics
from mtl.runs import resolve_config, run_name, run_url
from mtl.weighting import DWAWeighting, FAMOWeighting, UncertaintyWeighting, build_weighting


def test_runs_of_earlier_versions_keep_their_names():
    """The new fields at their values from before they existed (both tasks, fixed weights, every
    3x3 conv of a dilated stage dilated, AdamW's decoupled decay) stay out of the run's hash."""
    before = ExperimentConfig().with_values({"model.dilated_convs": "all", "optim.weight_decay_style": "decoupled"})
    assert run_name(before) == "deeplabv3p_resnet34_os16_adam-lr4e-4_w0.5_bs16_e16-8ab69ba8"
    assert run_name(ExperimentConfig()) != run_name(before)  # (today's default encoder and Adam train another network)


def test_uncertainty_weights_fall_for_a_task_whose_loss_is_scaled_up():
    """Kendall et al.: the optimum of 0.5 exp(-s) L + 0.5 s is s = log L, i.e. w L = 0.5: a task
    with a 10x larger loss ends with a 10x smaller weight."""
    u = UncertaintyWeighting([0.5, 0.5], lr=0.05)
    assert u.weights().tolist() == [0.5, 0.5]
    for _ in range(600):
        u.observe(torch.tensor([1.0, 10.0]))
    w = u.weights()
    assert w[1] < w[0] / 5
    assert u.log_var.tolist() == pytest.approx([0.0, math.log(10.0)], abs=0.1)


def test_uncertainty_averages_micro_batches_before_its_step():
    a, b = UncertaintyWeighting([0.5, 0.5], 0.05), UncertaintyWeighting([0.5, 0.5], 0.05)
    a.observe(torch.tensor([1.0, 2.0]), last_micro_batch=False)
    a.observe(torch.tensor([3.0, 4.0]), last_micro_batch=True)
    b.observe(torch.tensor([2.0, 3.0]))
    assert torch.equal(a.log_var, b.log_var) and a.adam.t.tolist() == [1, 1]


def test_famo_lowers_the_weight_of_the_task_that_improves_fastest():
    """FAMO balances the rates of improvement: segmentation's loss falls 5 % per step while
    depth's stays, so segmentation's share z falls; the step's weights w_i = z_i / (c L_i) sum to 1."""
    f = FAMOWeighting([0.5, 0.5], lr=0.025)
    for t in range(60):
        losses = torch.tensor([2.0 * 0.95**t, 1.0])
        f(losses)
        f.observe(losses)
    z = torch.softmax(f.logits, 0)
    assert z[0] < 0.4 < 0.6 < z[1]
    total, w = f(losses), f.weights()
    assert float(w.sum()) == pytest.approx(1.0)
    expected = (z / (losses + f.EPS)) / (z / (losses + f.EPS)).sum()
    assert torch.allclose(w, expected) and float(total) == pytest.approx(float((expected * losses).sum()), rel=1e-5)


def test_famo_makes_no_step_before_it_has_a_previous_loss():
    f = FAMOWeighting([0.5, 0.5], lr=0.025)
    f.observe(torch.tensor([1.0, 3.0]))
    assert f.logits.tolist() == pytest.approx([math.log(0.5)] * 2) and f.adam.t.tolist() == [0, 0]


def test_famo_leaves_a_task_without_labels_in_a_batch_out_of_it():
    """A batch without valid depth (loss 0): z / L would give depth all the weight, with no
    gradient behind it, and segmentation none; and the next update would read a huge change.
    Depth sits the batch out instead: segmentation takes the whole step, and the logits move
    as if the batch had not been there."""
    f, g = FAMOWeighting([0.5, 0.5], lr=0.025), FAMOWeighting([0.5, 0.5], lr=0.025)
    for t in range(5):
        for w in (f, g):
            w.observe(torch.tensor([2.0 * 0.9**t, 1.0]))
    total = f(torch.tensor([1.5, 0.0]))
    g(torch.tensor([1.5, 1.0]))  # (the readout's weights: for depth's last known loss)
    assert float(total) == pytest.approx(1.5) and f.weights().tolist() == pytest.approx(g.weights().tolist())
    f.observe(torch.tensor([1.5, 0.0]))
    f.observe(torch.tensor([1.4, 1.0]))
    g.observe(torch.tensor([1.4, 1.0]))
    assert torch.isfinite(f.logits).all()
    assert (f.logits - g.logits).abs().max() < 0.05  # (the semseg-only step moves them a little, by semseg's change)


def test_a_micro_batch_without_a_tasks_labels_does_not_pull_its_mean_down():
    """Gradient accumulation over micro-batches with depth losses 2 and 0 (no valid depth in the
    second): the step's depth loss is 2, not 1, so FAMO reads no improvement and uncertainty
    weighting no smaller loss; a step with no depth at all leaves depth's weight alone."""
    famo = FAMOWeighting([0.5, 0.5], lr=0.025)
    for last in (True, False):
        famo.observe(torch.tensor([2.0, 2.0]), last_micro_batch=last)
    famo.observe(torch.tensor([2.0, 0.0]))
    assert famo.prev.tolist() == [2.0, 2.0] and torch.softmax(famo.logits, 0).tolist() == pytest.approx([0.5, 0.5])
    u = UncertaintyWeighting([0.5, 0.5], lr=0.05)
    u.observe(torch.tensor([3.0, 3.0]))
    depth = u.log_var[1].item()
    for _ in range(3):  # (Adam's momentum from the step before must not move it either)
        u.observe(torch.tensor([3.0, 0.0]))
    assert u.log_var[1].item() == depth and u.adam.t.tolist() == [4, 1]
    old = {k: v for k, v in u.state_dict().items()}
    old["count"], old["adam.t"] = torch.zeros(()), torch.tensor(4.0)  # (a checkpoint from before the per-task counts)
    restored = UncertaintyWeighting([0.5, 0.5], lr=0.05)
    restored.load_state_dict(old)
    assert restored.adam.t.tolist() == [4, 4] and restored.count.tolist() == [0, 0]
    restored.observe(torch.tensor([3.0, float("nan")]))  # (a NaN loss is no label either: it reaches no moment)
    assert torch.isfinite(restored.log_var).all() and torch.isfinite(restored.adam.v).all()


def test_famo_weighs_every_ranks_gradient_alike():
    """Two ranks whose losses differ tenfold: each weighs its gradient by the ranks' mean losses
    (one all-reduce, here a stand-in), so DDP's average of their gradients is FAMO's step on the
    whole batch; a rank without depth labels still weighs its segmentation like the other."""
    def rank(mine: list[float], other: list[float]) -> FAMOWeighting:
        f = FAMOWeighting([0.5, 0.5], lr=0.025)
        theirs = torch.tensor(other)
        f.average = lambda t: (t + torch.cat([theirs, (theirs > 0).float()])) / 2
        f(torch.tensor(mine))
        return f

    for a, b in (([1.0, 1.0], [10.0, 30.0]), ([1.0, 0.0], [10.0, 30.0])):
        assert rank(a, b).weights().tolist() == pytest.approx(rank(b, a).weights().tolist())
    z = 0.5  # (both logits start equal): w_i = (z / L_i) / sum_j z / L_j for the mean losses 5.5 and 15.5
    expected = [1 / 5.5 / (1 / 5.5 + 1 / 15.5), 1 / 15.5 / (1 / 5.5 + 1 / 15.5)]
    assert rank([1.0, 1.0], [10.0, 30.0]).weights().tolist() == pytest.approx(expected, rel=1e-5) and z


def test_dwa_weights_follow_the_loss_ratios_of_the_last_two_epochs():
    d = DWAWeighting([0.5, 0.5], temperature=2.0)
    d.end_epoch([1.0, 1.0])
    assert d.weights().tolist() == [0.5, 0.5]  # one epoch seen: no ratio yet
    d.end_epoch([0.5, 1.0])  # segmentation halved, depth stalled: depth gets more weight
    e = [math.exp(0.5 / 2), math.exp(1.0 / 2)]
    assert d.weights().tolist() == pytest.approx([e[0] / sum(e), e[1] / sum(e)])


def test_dwa_stays_finite_when_a_loss_ratio_is_large():
    d = DWAWeighting([0.5, 0.5], temperature=0.05)
    d.end_epoch([1.0, 0.001])
    d.end_epoch([1.0, 2.0])  # depth's loss x2000: exp(2000 / 0.05) would overflow
    assert d.weights().tolist() == pytest.approx([0.0, 1.0])


def test_a_batch_without_labelled_pixels_gives_a_zero_loss_and_learned_weights_stay_finite():
    """An all-ignore (255) semseg batch, or one without valid depth: that task's loss is 0, not
    NaN (a mean over no pixels), so uncertainty and FAMO weights go on learning; elsewhere the
    loss is the mean over labelled pixels, as torch's own ignore_index mean."""
    from mtl.losses import DepthCodec, task_losses

    torch.manual_seed(0)
    out = {"semseg": [torch.randn(2, 19, 4, 4, requires_grad=True)], "depth": [torch.randn(2, 1, 4, 4, requires_grad=True)]}
    batch = {"semseg": torch.full((2, 4, 4), 255), "depth": torch.full((2, 4, 4), 10.0), "valid": torch.zeros(2, 4, 4, dtype=torch.bool)}
    codec = DepthCodec("log")
    assert task_losses(out, batch, codec).tolist() == [0.0, 0.0]
    for weighting in (UncertaintyWeighting([0.5, 0.5], 0.05), FAMOWeighting([0.5, 0.5], 0.05)):
        for _ in range(2):
            losses = task_losses(out, batch, codec)
            total = weighting(losses)
            total.backward()
            weighting.observe(losses.detach())
        assert torch.isfinite(weighting.weights()).all() and torch.isfinite(out["semseg"][0].grad).all(), weighting
    batch["semseg"][0, 0] = torch.arange(4)  # four labelled pixels
    expected = torch.nn.functional.cross_entropy(out["semseg"][0], batch["semseg"], ignore_index=255)
    assert task_losses(out, batch, codec)[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_single_task_runs_weigh_their_task_only_and_learned_methods_need_two():
    assert build_weighting(OptimConfig(tasks=("depth",))).weights().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="--task-weighting famo weighs two tasks"):
        ExperimentConfig(optim=OptimConfig(tasks=("semseg",), task_weighting="famo")).validate()
    with pytest.raises(ValueError, match="--tasks must name"):
        ExperimentConfig(optim=OptimConfig(tasks=("semseg", "semseg"))).validate()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        build_weighting(OptimConfig(task_weighting="uncertainty", semseg_weight=1.0))


def config(root, out, weighting: str = "fixed", tasks=("semseg", "depth"), resume: bool = False) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(root=root, workers=0), model=ModelConfig(arch="deeplabv3p", encoder="resnet18"),
        optim=OptimConfig(lr=1e-3, task_weighting=weighting, tasks=tasks, weighting_lr=0.05, dwa_temperature=0.5),
        train=TrainConfig(epochs=3, batch_size=8, max_steps_per_epoch=2, out=str(out), device="cpu", log_every=1, resume=resume),
    ).validate()


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "famo"])
def test_each_weighting_trains_and_resumes_exactly(tiny_root, tmp_path, weighting):
    """Three epochs; then the run's pointer is moved back to epoch 2's checkpoint and resumed:
    the third epoch trained again equals the first time, task weights and network alike."""
    cfg = config(tiny_root, tmp_path, weighting)
    straight = fit(cfg, local_runtime(cfg))
    weights = [(m["weights/semseg"], m["weights/depth"]) for m in straight.metrics]
    assert all(sum(w) == pytest.approx(1.0) for w in weights) or weighting == "uncertainty"
    assert weights[-1] != (0.5, 0.5)  # the method moved them
    assert f"w0.5-{weighting}" in run_name(cfg)
    CheckpointIndex(run_url(cfg)).commit("epoch-0002")  # as if the run had died during epoch 3
    again = config(tiny_root, tmp_path, weighting, resume=True)
    resumed = fit(again, local_runtime(again))
    a, b = straight.metrics[-1], resumed.metrics[-1]
    for k in ("weights/semseg", "weights/depth", "train_loss", "miou", "si_log_rmse"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    for (name, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6), name


def test_a_single_task_run_reports_its_task_and_picks_its_best_by_it(tiny_root, tmp_path):
    cfg = config(tiny_root, tmp_path, tasks=("depth",)).with_values({"train.epochs": 1})
    result = fit(cfg, local_runtime(cfg))
    m = result.metrics[-1]
    assert "depth-only" in run_name(cfg)
    assert "miou" not in m and "grader" not in m and not any(k.startswith("iou/") for k in m)
    assert "train_loss_semseg" not in m and m["train_loss_depth"] == m["train_loss"]  # (the other head: weighted 0)
    assert m["score"] == -m["si_log_rmse"] == result.best_score
    assert not any(k.startswith("weights/") for k in m)  # (one task: its weight 1, the other's 0, a column of nothing)
    # the Trainer's tracker wrote what a person watches (read with TensorBoard's own reader)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(f"{run_url(cfg)}/tb", size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    assert {"train/loss_depth", "train/lr", "train/images_per_s", "val/score", "val/si_log_rmse"} <= set(tags["scalars"])
    assert not {"train/loss_semseg", "weights/depth", "weights/semseg"} & set(tags["scalars"])
    log = (tmp_path / run_name(cfg) / "train.log").read_text()
    progress = [line for line in log.splitlines() if " epoch 1/1 step " in line]
    assert progress and all("(depth " in line and "semseg" not in line for line in progress)
    assert "images/val/0" in tags["images"] and (tmp_path / run_name(cfg) / "curves.png").stat().st_size > 1000


def write_run(folder, tasks, epochs: list[dict], exist_ok: bool = False, root: str | None = None) -> str:
    """A hand-made run folder: config.json (of a run on ``root``, else the synthetic set), one
    metrics file per epoch and the pointer to the last epoch's checkpoint (committed)."""
    folder.mkdir(parents=True, exist_ok=exist_ok)
    (folder / "config.json").write_text(ExperimentConfig(data=DataConfig(root=root), optim=OptimConfig(tasks=tasks)).to_json())
    (folder / "metrics").mkdir(exist_ok=exist_ok)
    for i, m in enumerate(epochs, 1):
        (folder / "metrics" / f"epoch-{i:04d}.json").write_text(json.dumps(m))
    (folder / "checkpoints").mkdir(exist_ok=exist_ok)
    (folder / "checkpoints/latest.json").write_text(json.dumps({"latest": f"epoch-{len(epochs):04d}",
                                                                 "history": [f"epoch-{len(epochs):04d}"]}))
    return str(folder)


def test_delta_m_against_hand_made_baselines_matches_a_hand_computation(tmp_path):
    seg = write_run(tmp_path / "seg", ("semseg",), [{"miou": 50.0}, {"miou": 60.0}, {"miou": 55.0}])  # best: epoch 2
    dep_metrics = {"si_log_rmse": 20.0, "abs_rel": 0.2, "rmse": 10.0, "delta1": 80.0}
    # (a first epoch that diverged is no best epoch: not a number, it is passed over)
    dep = write_run(tmp_path / "dep", ("depth",), [{**dep_metrics, "si_log_rmse": float("nan")}, {**dep_metrics, "si_log_rmse": 25.0},
                                                   dep_metrics])
    baselines = read_baselines([seg, dep])
    assert baselines["semseg"]["miou"] == 60.0 and baselines["depth"]["si_log_rmse"] == 20.0
    mtl = {"miou": 63.0, "si_log_rmse": 19.0, "abs_rel": 0.22, "rmse": 10.0, "delta1": 84.0}
    # by hand: semseg -(63-60)/60 = -5 %; depth mean of (19-20)/20 = -5 %, +10 %, 0 %, -(84-80)/80 = -5 % -> 0 %
    assert delta_m(mtl, baselines) == pytest.approx((-5.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="single-task run"):
        read_baselines([write_run(tmp_path / "both", ("semseg", "depth"), [{"miou": 1.0, "si_log_rmse": 1.0}])])
    with pytest.raises(ValueError, match="baseline for depth"):
        delta_m(mtl, {"semseg": baselines["semseg"]})
    with pytest.raises(ValueError, match="no config.json"):
        read_baselines([str(tmp_path / "nowhere")])
    # an epoch whose checkpoint never committed (the attempt died in between): its numbers are no model's
    (tmp_path / "seg/checkpoints/latest.json").write_text(json.dumps({"latest": "epoch-0001-step-00000009", "history": []}))
    assert read_baselines([seg])["semseg"]["miou"] == 50.0
    with pytest.raises(ValueError, match="nan: no epoch's validation score is a number"):
        read_baselines([write_run(tmp_path / "nan", ("semseg",), [{"miou": float("nan")}])])


def test_a_run_given_baselines_is_judged_by_delta_m(tiny_root, tmp_path, monkeypatch):
    """--baselines: every epoch reports Δm against the baselines' best epochs, the score is -Δm,
    and best.pt is the lowest-Δm epoch. A folder that is no run, or a run validated on other data,
    is named before anything starts; a resume keeps the values it started with."""
    seg = write_run(tmp_path / "seg", ("semseg",), [{"miou": 20.0}], root=tiny_root)
    dep_metrics = {"si_log_rmse": 40.0, "abs_rel": 0.5, "rmse": 20.0, "delta1": 30.0}
    dep = write_run(tmp_path / "dep", ("depth",), [dep_metrics], root=tiny_root)
    cfg = config(tiny_root, tmp_path / "runs").with_values({"train.baselines": (seg, dep)})
    result = fit(cfg, local_runtime(cfg))
    baselines = read_baselines([seg, dep])
    for m in result.metrics:
        assert m["delta_m"] == pytest.approx(delta_m(m, baselines)) and m["score"] == -m["delta_m"]
        assert m["grader"] == pytest.approx(m["miou"] - m["si_log_rmse"])  # still reported
    assert result.best_score == max(m["score"] for m in result.metrics) == -min(m["delta_m"] for m in result.metrics)
    stored = json.loads((tmp_path / "runs" / run_name(cfg) / "metrics/epoch-0003.json").read_text())
    assert stored["delta_m"] == result.metrics[-1]["delta_m"]
    assert f"judged by Δm against {seg} and {dep}" in (tmp_path / "runs" / run_name(cfg) / "train.log").read_text()
    # a baseline run trained on meanwhile: the resumed run keeps the values its best score was computed against
    write_run(tmp_path / "seg", ("semseg",), [{"miou": 20.0}, {"miou": 45.0}], exist_ok=True, root=tiny_root)
    more = cfg.with_values({"train.epochs": 4, "train.resume": True, "train.name": run_name(cfg)})
    last = fit(more, local_runtime(more)).metrics[-1]
    assert last["delta_m"] == pytest.approx(delta_m(last, baselines)) and read_baselines([seg, dep]) != baselines
    log = tmp_path / "runs" / run_name(cfg) / "train.log"
    assert "the Δm baselines' best epochs changed since this run started (semseg)" in log.read_text()
    # ... also when a baseline's folder cannot be read any more: --baselines names the run, so it cannot be left out
    os.rename(tmp_path / "seg", tmp_path / "seg-moved")
    again = more.with_values({"train.epochs": 5})
    last = fit(again, local_runtime(again)).metrics[-1]
    assert last["epoch"] == 5 and last["delta_m"] == pytest.approx(delta_m(last, baselines))
    assert f"the Δm baselines cannot be used again ({seg} is not a run folder (no config.json)): the run goes on" in log.read_text()
    os.rename(tmp_path / "seg-moved", tmp_path / "seg")
    # relative folders become absolute (Ray runs workers in folders of their own), and name the same run
    monkeypatch.chdir(tmp_path)
    relative = resolve_config(cfg.with_values({"train.baselines": ("seg", "./dep/")}))
    assert relative.train.baselines == (seg, dep) and relative.train.name == run_name(cfg)
    wrong = cfg.with_values({"train.baselines": (seg, str(tmp_path / "nowhere")), "train.name": "wrong"})
    with pytest.raises(ValueError, match=f"{tmp_path}/nowhere is not a run folder"):
        fit(wrong, local_runtime(wrong))
    assert not (tmp_path / "runs" / "wrong").exists()
    elsewhere = write_run(tmp_path / "dep-synthetic", ("depth",), [dep_metrics])  # (validated on the synthetic set)
    wrong = cfg.with_values({"train.baselines": (seg, elsewhere), "train.name": "wrong"})
    with pytest.raises(ValueError, match=rf"--baselines: {elsewhere} was validated on the synthetic set of --synthetic-size "
                                         rf"128x256 --synthetic-counts 400 80 80, and this run is on --root {tiny_root}: Δm"):
        fit(wrong, local_runtime(wrong))
    assert not (tmp_path / "runs" / "wrong").exists()


def test_task_metrics_leave_out_the_untrained_task():
    m = {"miou": 40.0, "iou/road": 90.0, "si_log_rmse": 30.0, "abs_rel": 0.3, "grader": 10.0, "train_loss": 1.0}
    assert task_metrics(m, ("semseg",)) == {"miou": 40.0, "iou/road": 90.0, "train_loss": 1.0, "score": 40.0}
    assert task_metrics(m, ("semseg", "depth"))["score"] == 10.0 == selection_score(m, ("semseg", "depth"))
