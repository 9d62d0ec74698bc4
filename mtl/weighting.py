"""How the task losses become one loss (``--task-weighting``): fixed, uncertainty, DWA, FAMO.

Every method returns ``total = sum_i w_i * L_i`` with weights that carry no gradient, so the
network's gradient is always a weighted sum of the task gradients and the weights sum to 1 where
the method allows it (fixed, DWA, FAMO: the same LR means the same step size as ``--semseg-weight``).
The learned methods update their own few numbers with analytic gradients and a tiny Adam held in
tensors instead of putting them into the network's optimizer. Why:

* no host sync and no new tensor per step: the whole update is in-place tensor work, so the
  train step stays sync-free and can still be captured as one CUDA graph (`mtl.cuda_graph`);
* no change to the model, its DDP/DeepSpeed wrapper or the checkpoint's ``model``: the weights
  are their own stateful part (``state_dict``), restored exactly on resume;
* every rank holds the same weights: the loss values they learn from are averaged over ranks
  first (``average``: one small all-reduce per step, only for the learned methods; FAMO's
  weights, made from the current losses, take one more per micro-batch), which for uncertainty
  weighting gives exactly the gradient DDP would have averaged;
* a batch without a task's labels has that task's loss 0 (`mtl.losses.task_losses`): the means
  the per-step methods (uncertainty, FAMO) learn from are over the micro-batches and ranks that
  had them (`_present_mean`), and a task none had sits the step out. DWA's epoch means are the
  run's logged epoch losses, over all micro-batches (a label-less one adds 0): its ratio of two
  epochs is unchanged as long as the share of such batches is (every Miniscapes and Cityscapes
  image has both labels).

Methods (K = 2 tasks; ``base`` = (w, 1 - w) from ``--semseg-weight``):

* ``fixed``: w_i = base_i. A single-task run (``--tasks``) is fixed with its task's weight 1.
* ``uncertainty`` (Kendall et al. 2018), in the common form 0.5 exp(-s_i) L_i + 0.5 s_i with
  s_i = log sigma_i^2 learned: w_i = 0.5 exp(-s_i), started at base_i. The gradient of the
  objective in s_i is 0.5 - w_i L_i: a task whose loss grows gets a smaller weight.
* ``dwa`` (Liu et al. 2019, MTAN): after each epoch, r_i = L_i(e-1) / L_i(e-2) from the epoch
  mean losses and w = normalise(base * exp(r / T)); base for the first two epochs. The paper's
  weights sum to K; here to 1, as fixed ones do.
* ``famo`` (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization"): the gradient-level
  method, at the cost of a loss-level one (no per-task gradients, no extra backward; works
  under DDP and DeepSpeed unchanged). Logits xi, z = softmax(xi); the step follows
  sum_i z_i grad log L_i normalised, i.e. w_i = z_i / (c L_i) with c = sum_j z_j / L_j, so that
  every task's loss falls at a rate set by z. After each step xi moves against the tasks that
  improved most: delta_i = log L_i(t-1) - log L_i(t), grad xi = J_softmax^T delta, Adam
  (``--weighting-lr``, weight decay 1e-3 as in the paper's code). The paper recomputes the
  batch's loss after the update; here the next step's loss stands in for it (no extra forward,
  a noisier estimate). Under ``--grad-accum`` each micro-batch's gradient is weighed by its own
  losses (the ranks' mean of them): the step's weights are not known before its last
  micro-batch, and its earlier ones are already in the gradient. So ``--grad-accum 2`` on one
  process weighs a global batch a little otherwise than 2 ranks do; z learns from the step's
  mean losses either way.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mtl.config import OptimConfig
from mtl.multitask import TASKS

Average = Callable[[torch.Tensor], torch.Tensor]  # a tensor's mean over ranks (identity on one process)


class TaskWeighting(nn.Module):
    """The base: fixed weights in a buffer. Subclasses change them in place (a captured CUDA
    graph reads the same storage at every replay)."""

    learned = False  # updates its weights from every step's losses (needs `observe` and an all-reduce)
    epochwise = False  # updates its weights from every epoch's mean losses (`end_epoch`)
    stateful = False  # has state a checkpoint must hold

    def __init__(self, base: list[float]) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor(base, dtype=torch.float32))
        self.average: Average = lambda t: t

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """``losses``: the K task losses (a tensor); the weighted total."""
        return (self.weights() * losses).sum()

    def weights(self) -> torch.Tensor:
        """The weights the next step uses (detached, on the device)."""
        return self.w

    def observe(self, losses: torch.Tensor, last_micro_batch: bool = True) -> None:
        """After a micro-batch's backward: its (detached) task losses."""

    def end_epoch(self, mean_losses: list[float]) -> None:
        """After an epoch: the task losses' means over it and over all ranks."""

    def _present_mean(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Per task, the ranks' loss ``sums`` over their ``counts`` of micro-batches that had the
        task's labels (one all-reduce); 0 for a task none had."""
        both = self.average(torch.cat([sums, counts]))
        k = sums.numel()
        return both[:k] / both[k:].clamp(min=1e-12)


class _AdamState(nn.Module):
    """Adam over one small vector, as tensors updated in place (no host sync, capturable); its
    step count per element, so that an element can sit a step out (``gate``)."""

    def __init__(self, n: int, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.register_buffer("m", torch.zeros(n))
        self.register_buffer("v", torch.zeros(n))
        self.register_buffer("t", torch.zeros(n))

    def step(self, param: torch.Tensor, grad: torch.Tensor, gate: torch.Tensor | float = 1.0) -> None:
        """``param -= lr * adam(grad)``; ``gate`` 0 (all of it, or per element) skips the step
        there, momentum included, without a branch on the host."""
        b1, b2 = self.betas
        grad = grad + self.weight_decay * param
        self.t.add_(gate)
        self.m.mul_(1 - (1 - b1) * gate).add_(gate * (1 - b1) * grad)
        self.v.mul_(1 - (1 - b2) * gate).add_(gate * (1 - b2) * grad * grad)
        t = self.t.clamp(min=1)
        m_hat, v_hat = self.m / (1 - b1**t), self.v / (1 - b2**t)
        param.sub_(gate * self.lr * m_hat / (v_hat.sqrt() + 1e-8))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        t = state_dict.get(prefix + "t")
        if t is not None and t.dim() == 0:  # (checkpoints before per-element step counts)
            state_dict[prefix + "t"] = t.expand(len(self.m)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _Accumulated(TaskWeighting):
    """A learned method: the micro-batches' losses are summed until the optimizer step, averaged
    over ranks, then `update` runs once per optimizer step."""

    learned = stateful = True

    def __init__(self, base: list[float]) -> None:
        super().__init__(base)
        self.register_buffer("pending", torch.zeros(len(base)))
        self.register_buffer("count", torch.zeros(len(base)))  # per task: the micro-batches with its labels

    def observe(self, losses: torch.Tensor, last_micro_batch: bool = True) -> None:
        losses = losses.detach().float()
        self.pending.add_(losses)
        self.count.add_((losses > 0).float())
        if last_micro_batch:
            self.update(self._present_mean(self.pending, self.count))
            self.pending.zero_()
            self.count.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        count = state_dict.get(prefix + "count")
        if count is not None and count.dim() == 0:  # (checkpoints before per-task counts; 0 between steps)
            state_dict[prefix + "count"] = count.expand(len(self.pending)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update(self, losses: torch.Tensor) -> None:
        raise NotImplementedError


class UncertaintyWeighting(_Accumulated):
    """Learned log-variances s_i, w_i = 0.5 exp(-s_i) (see the module docstring)."""

    def __init__(self, base: list[float], lr: float) -> None:
        super().__init__(base)
        self.register_buffer("log_var", torch.tensor([-math.log(2 * b) for b in base]))
        self.adam = _AdamState(len(base), lr)

    def weights(self) -> torch.Tensor:
        return 0.5 * torch.exp(-self.log_var)

    def update(self, losses: torch.Tensor) -> None:
        # (a task without labels in the step sits it out, momentum too: 0.5 alone would lower its weight)
        present = losses > 0  # (a NaN loss too is not present: 0 * NaN would still reach Adam's moments)
        self.adam.step(self.log_var, torch.where(present, 0.5 - self.weights() * losses, 0.0), gate=present.float())


class FAMOWeighting(_Accumulated):
    """Fast Adaptive Multitask Optimization (see the module docstring)."""

    EPS = 1e-8

    def __init__(self, base: list[float], lr: float, weight_decay: float = 1e-3) -> None:
        super().__init__(base)
        self.register_buffer("logits", torch.tensor([math.log(b) for b in base]))
        self.register_buffer("prev", torch.zeros(len(base)))  # last step's mean task losses
        self.register_buffer("has_prev", torch.zeros(()))
        self.register_buffer("last", torch.ones(len(base)))  # the losses the current weights were made for
        self.adam = _AdamState(len(base), lr, weight_decay)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        # L: the ranks' mean losses, so that every rank weighs its gradient alike and DDP's average
        # is FAMO's step on the global batch. A task no rank has labels for in this batch (loss 0)
        # sits it out, or z / L would hand it all the weight, with no gradient behind it
        local = losses.detach().float()
        mean = self._present_mean(local, (local > 0).float())
        present, d = mean > 0, mean + self.EPS
        z = torch.softmax(self.logits, 0)
        w = torch.where(present, z / d, 0.0)
        w = w / w.sum().clamp(min=self.EPS)  # = z_i / (c L_i)
        self.last.copy_(torch.where(present, d, self.last))
        return (w.to(losses.dtype) * losses).sum()

    def weights(self) -> torch.Tensor:
        z = torch.softmax(self.logits, 0)
        w = z / self.last
        return w / w.sum()

    def update(self, losses: torch.Tensor) -> None:
        present = losses > 0  # (a task without labels in the step: no change to judge; its last loss stays)
        cur = torch.where(present, losses + self.EPS, self.prev)
        change = torch.log(self.prev.clamp(min=self.EPS)) - torch.log(cur.clamp(min=self.EPS))
        delta = torch.where(present & (self.prev > 0), change, 0.0)
        z = torch.softmax(self.logits, 0)
        grad = z * delta - z * (z * delta).sum()  # J_softmax^T delta
        self.adam.step(self.logits, grad, gate=self.has_prev)
        self.prev.copy_(cur)
        self.has_prev.fill_(1.0)


class DWAWeighting(TaskWeighting):
    """Dynamic Weight Average over epoch mean losses (see the module docstring)."""

    stateful = epochwise = True

    def __init__(self, base: list[float], temperature: float) -> None:
        super().__init__(base)
        self.temperature = temperature
        self.register_buffer("base", torch.tensor(base, dtype=torch.float32))
        self.register_buffer("history", torch.zeros(2, len(base), dtype=torch.float64))  # epochs e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def end_epoch(self, mean_losses: list[float]) -> None:
        self.history[0] = self.history[1]
        self.history[1] = torch.tensor(mean_losses, dtype=torch.float64)
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            r = self.history[1] / self.history[0].clamp(min=1e-12)
            # base * exp(r / T), normalised: as a softmax of logs, which a large ratio cannot overflow
            w = torch.softmax(self.base.double().cpu().log() + (r / self.temperature).cpu(), 0)
            self.w.copy_(w.to(self.w))


def build_weighting(o: OptimConfig) -> TaskWeighting:
    """The ``--task-weighting`` method over `mtl.multitask.TASKS` (a single-task run: fixed,
    weight 1 for its task and 0 for the other)."""
    if len(o.tasks) == 1:
        return TaskWeighting([1.0 if t in o.tasks else 0.0 for t in TASKS])
    o.validate()  # (e.g. a learned weighting starts from a --semseg-weight strictly between 0 and 1)
    base = [o.semseg_weight, 1.0 - o.semseg_weight]
    if o.task_weighting == "uncertainty":
        return UncertaintyWeighting(base, o.weighting_lr)
    if o.task_weighting == "famo":
        return FAMOWeighting(base, o.weighting_lr)
    if o.task_weighting == "dwa":
        return DWAWeighting(base, o.dwa_temperature)
    return TaskWeighting(base)
