"""The whole train step as one CUDA graph: forward, loss, backward and optimizer update
replayed with one launch.

Why: at batch 16 an eager step of these models dispatches 1000-2000 ATen ops, and the host needs
about as long to queue them (~30 ms, measured on an H100 host) as the GPU needs to run them: the
GPU waits on Python, and everything the full path adds on the host (DDP's hooks, the loss, the
augmentation kernels) adds to the step time one for one. A replayed step costs the host one
launch plus the copies of the batch into the graph's input buffers.

How (PyTorch's whole-network capture with `torch.cuda.graph`):

- the first ``warmup`` steps run eagerly on the capture stream, so that cuDNN's autotuning, lazy
  library handles, the optimizer's state and DDP's buckets are made there, outside the capture
  (DDP's wrapper is built on the same stream, `capture_stream`);
- then the eager step function itself is captured once, over static input buffers: the graph
  trains exactly what the eager path trains;
- every later step copies its batch into those buffers and replays the graph. The loss tensors
  it returns are the graph's static outputs: read (or accumulate) them before the next step,
  as the train loop does.

What the graph needs from the rest: the learning rate in a device tensor (`prepare_optimizer`;
`mtl.schedule.PolyLR.apply` fills it in place), optimizer groups marked capturable, parameters
and optimizer states that keep their storage (checkpoints are restored before the first step).
A batch of another shape runs eagerly (one process only: under DDP a rank that replayed while
another ran eagerly would mix captured and uncaptured collectives, which NCCL forbids).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch

Batch = dict[str, torch.Tensor]
StepFn = Callable[[Batch, bool], Batch]  # (batch, last micro-batch) -> detached loss tensors
# what a train step reads from a model batch (`mtl.data.batch.to_model_batch`): the graph's inputs
STEP_KEYS = ("rgb", "semseg", "depth", "valid")
# eager steps before the capture: cuDNN autotuning and lazy state need one or two; PyTorch's
# DDP notes ask for 11 (its reducer rebuilds buckets after the first, logs at the tenth)
WARMUP_PLAIN, WARMUP_DDP = 3, 11

# what a rank whose own capture worked raises when another's failed (`agree`): the launcher
# reports the rank that says why instead (`mtl.distributed.ray_train.run_ray`)
OTHER_RANK_FAILED = "another rank's capture failed"


def indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: one name per GPU, for keys and comparisons."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of a GPU on which DDP is built, warm-up steps run and the step is
    captured: objects that remember a stream (DDP's AccumulateGrad nodes, library handles)
    should see the one their forwards and the capture run on (PyTorch warns of extra syncs
    otherwise and names it a cause of failed captures)."""
    return _stream(indexed(device))


@functools.lru_cache(maxsize=None)
def _stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@contextlib.contextmanager
def on_capture_stream(device: torch.device) -> Iterator[None]:
    """Run a block on `capture_stream`, ordered after and before the current stream's work."""
    if device.type != "cuda":
        yield
        return
    main, side = torch.cuda.current_stream(device), capture_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def cuda_capture(fn: Callable[[], Batch], device: torch.device) -> tuple[Callable[[], None], Batch]:
    """Capture ``fn()`` (nothing runs); returns (replay, its static outputs). Thread-local capture
    mode: the loader's pin-memory thread may allocate pinned memory meanwhile."""
    graph, before = torch.cuda.CUDAGraph(), torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph, stream=capture_stream(device), capture_error_mode="thread_local"):
            out = fn()
    finally:  # a failed capture raises before the context puts the current stream back
        torch.cuda.set_stream(before)
    return graph.replay, out


def allocator_left_capturing() -> str | None:
    """After a failed capture: why the CUDA caching allocator cannot go on, or None. Releases
    without pytorch#180395 (torch 2.11 among them) skip ending the capture's allocation routing
    when the capture's end raises: every block freed afterwards then waits for a capture that
    never ends (a batch marked for the prefetch stream is never reused: out of memory after a few
    thousand eager steps), and ``empty_cache()`` fails its internal assertion. That assertion is
    the test: a working allocator empties its cache, which costs nothing more."""
    try:
        torch.cuda.empty_cache()
    except RuntimeError as e:
        if "captures_underway" not in str(e):
            raise  # (another error of the device, e.g. one the failed capture left: itself, not this diagnosis)
        return str(e).splitlines()[0]
    return None


def prepare_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """What a captured ``optimizer.step()`` needs: each group's LR as a float32 tensor on the
    device (a Python float would be baked into the graph; the LR plan fills the tensor) and
    ``capturable`` groups (Adam refuses to be captured otherwise)."""
    device = indexed(device)
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device and lr.dtype == torch.float32):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        if "capturable" in group:
            group["capturable"] = True


class CapturedStep:
    """A `StepFn` that runs ``eager`` for ``warmup`` steps, then captures it once and replays it
    (see the module docstring). ``capture`` is `cuda_capture` on a GPU; tests pass a stand-in.

    A failed capture is raised when ``strict``, else logged, and the eager step runs for the rest
    of the run (unless torch left its allocator capturing: `allocator_left_capturing`). Several
    ranks (``agree``: True when every rank's capture succeeded, one all-reduce) go on only
    together: a rank running eagerly beside ranks that replay their captured all-reduce would
    hang the group, so if any rank's capture failed every rank raises.
    They also refuse a batch of another shape instead of running it eagerly."""

    def __init__(self, eager: StepFn, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = WARMUP_PLAIN,
                 capture: Callable[[Callable[[], Batch], torch.device], tuple[Callable[[], None], Batch]] = cuda_capture,
                 log: Callable[[str], None] = print, strict: bool = False,
                 agree: Callable[[bool], bool] | None = None) -> None:
        self.eager, self.optimizer, self.device, self.warmup = eager, optimizer, device, warmup
        self.capture, self.log, self.strict, self.agree = capture, log, strict or agree is not None, agree
        self.static: Batch | None = None  # the graph's input buffers
        self.out: Batch | None = None  # its output tensors
        self.replay: Callable[[], None] | None = None
        self.lrs: list[torch.Tensor] = []  # the LR tensors the graph reads
        self.failed = False
        self.eager_steps = self.replays = 0

    def __call__(self, batch: Batch, last_micro_batch: bool = True) -> Batch:
        if not last_micro_batch:
            raise ValueError("a captured train step is a whole optimizer step: it needs --grad-accum 1")
        if self.replay is not None and self._fits(batch):
            self._check_lrs()
            for k, buf in self.static.items():
                buf.copy_(batch[k], non_blocking=True)
            self.replay()
            self.replays += 1
            return self.out
        if self.replay is None and not self.failed and self.eager_steps >= self.warmup:
            return self._capture_and_run(batch)
        if self.replay is not None and self.agree is not None:
            shapes = {k: tuple(batch[k].shape) for k in STEP_KEYS}
            raise RuntimeError(f"a batch of shapes {shapes} does not fit the captured train step "
                               f"({ {k: tuple(v.shape) for k, v in self.static.items()} }): under DDP every rank must replay")
        self.eager_steps += 1
        with on_capture_stream(self.device):
            return self.eager(batch, True)

    def _fits(self, batch: Batch) -> bool:
        return all(batch[k].shape == buf.shape and batch[k].dtype == buf.dtype for k, buf in self.static.items())

    def _check_lrs(self) -> None:
        """The graph reads the LR tensors it was captured with; an optimizer whose groups or LR
        were replaced since (``load_state_dict``, a float LR) would train on with a frozen LR."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.lrs) or any(g["lr"] is not t for g, t in zip(groups, self.lrs)):
            raise RuntimeError("the optimizer's param groups or LR tensors were replaced after the train step was captured "
                               "as a CUDA graph, which would keep reading the old ones: restore state before the first "
                               "step, or build a new CapturedStep after loading it")

    def _capture_and_run(self, batch: Batch) -> Batch:
        prepare_optimizer(self.optimizer, self.device)
        # clone keeps each tensor's memory format (rgb stays channels_last)
        static = {k: batch[k].clone() for k in STEP_KEYS}
        # gradients made inside the capture live in the graph's memory: each replay's backward
        # writes them afresh, its optimizer step reads them
        self.optimizer.zero_grad(set_to_none=True)
        error = None
        try:
            replay, out = self.capture(lambda: self.eager(static, True), self.device)
        except Exception as e:  # noqa: BLE001 - raised when strict, else reported, then eager
            error = e
        own = error is not None
        if self.agree is not None and not self.agree(not own) and not own:
            error = RuntimeError(f"{OTHER_RANK_FAILED} (its log says why)")
        if error is not None:
            return self._failed(error, batch, own)
        self.static, self.out, self.replay = static, out, replay
        self.lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.log(f"train step captured as a CUDA graph after {self.eager_steps} eager steps; replayed from now on")
        replay()  # the capture recorded the step without running it: this runs it for this batch
        self.replays += 1
        return out

    def _failed(self, e: Exception, batch: Batch, own: bool = True) -> Batch:
        """``own``: this rank's capture raised (not only another rank's)."""
        what = f"capturing the train step as a CUDA graph failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if self.strict:
            raise RuntimeError(f"{what}; --cuda-graph off trains with the eager step") from e
        stuck = allocator_left_capturing() if own else None
        if stuck:
            raise RuntimeError(f"{what}; torch {torch.__version__} leaves its memory allocator capturing after that "
                               f"(pytorch#180395: {stuck}), so no eager step may follow in this process: --cuda-graph "
                               f"off trains with the eager step from the start") from e
        self.failed = True
        self.optimizer.zero_grad(set_to_none=True)
        self.log(f"{what}; training goes on with the eager step (--cuda-graph off says so up front)")
        return self(batch)

    def state(self) -> dict[str, Any]:
        """How the steps ran so far (for logs and tests)."""
        return {"captured": self.replay is not None, "failed": self.failed, "eager_steps": self.eager_steps,
                "replays": self.replays}
