"""Evaluate a checkpoint and export predictions in the submission format.

    python jobs/evaluate.py --checkpoint runs/<run>                 # metrics on val
    python jobs/evaluate.py --checkpoint runs/<run>/best.pt --split test --export out/test-preds
    python jobs/evaluate.py --checkpoint runs/<mtl run> --baselines runs/<semseg-only run> runs/<depth-only run>  # + Δm
    python jobs/evaluate.py --checkpoint runs/<run> --as-submitted   # depth scored as the submission PNG holds it

``--checkpoint`` takes a checkpoint file or a run folder (its latest checkpoint; with
``--baselines`` its ``best.pt``, as for the baselines: Δm compares best epochs). The data
defaults to what the checkpoint was trained on (its shards, else its folder, else the cached
synthetic set); ``--root`` names another Miniscapes folder and ``--shards`` another shard set (a
prefix holding manifest.json, or the manifest's URL), as in training (``--data``: either). A
split without labels (a real test split, rgb only) is exported without metrics.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from mtl.cli import parse
from mtl.config import Device
from mtl.data.miniscapes import Split


@dataclass(frozen=True)
class EvaluateCommand:
    checkpoint: str  # checkpoint file or run folder (local or s3://)
    #: Miniscapes folder (--root) or shard set (--shards), path or URL, as in training; the two are told apart by manifest.json;
    #: default: the data the checkpoint was trained on
    data: Annotated[str | None, tyro.conf.arg(aliases=("--root", "--shards"))] = None
    split: Split = "val"  # the split to evaluate or export
    export: str | None = None  # write submission PNGs + visualisations to this local folder
    viz: int | None = None  # side-by-side PNGs with --export; when not given: 8
    metrics: bool = True  # compute metrics (a split without labels gets none anyway); --no-metrics without --export: only say what would be evaluated (model, data; the image size when it is not the training size)
    batch_size: int = 8  # images per forward pass
    workers: int = 0  # loader processes for the metrics pass
    device: Device = "auto"  # auto: the GPU if there is one
    json: str | None = None  # also write the metrics to this JSON file
    #: score the depth as the submission PNG holds it: clamped to 4-300 m and quantised to its 255 disparity codes
    #: (the grader's numbers); default: as predicted, as validation in training scores it
    as_submitted: bool = False
    #: single-task baseline run folders (one trained with --tasks semseg, one with --tasks depth): their best.pt is
    #: evaluated on the same split and data, and Δm reported, the mean relative change against them in percent
    #: (lower is better; mtl.multitask)
    baselines: tuple[str, ...] = ()
    overwrite: bool = False  # replace a non-empty --export folder, or an existing --json file


def main(argv: list[str] | None = None) -> int:
    a = parse(EvaluateCommand, argv, description=__doc__)
    from mtl.errors import USER_ERRORS, one_line

    try:
        return run(a)
    except USER_ERRORS as e:  # a bad checkpoint, data, flag or output folder: one line naming it
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def run(a: EvaluateCommand) -> int:
    from mtl.data.build import open_split, resolve_source
    from mtl.engine import resolve_device
    from mtl.export import OUTPUT_FOLDERS, export_predictions, listed_folders, single_task_note
    from mtl.predict import load_model

    from mtl.atomic import check_output_file, output_dir

    check_flags(a)
    device = resolve_device(a.device)
    m = load_model(model_url(a), device)
    if a.as_submitted and "depth" not in m.cfg.optim.tasks:
        raise ValueError(f"--as-submitted scores the depth as its PNGs would hold it, and {m.url} predicts "
                         f"{', '.join(m.cfg.optim.tasks)} only: leave it out")
    source = resolve_source(trained_data(m), a.data)
    check_trained_data(m, source, a.data)
    inputs = (source.url, m.url, *a.baselines)  # what the exported folder must not replace
    if a.export:  # (checked before the long pass; again when written)
        output_dir(a.export, a.overwrite, inputs, OUTPUT_FOLDERS)
    if a.json:
        check_output_file(a.json, "--json", a.overwrite, inputs=inputs)
    data = open_split(source, a.split)
    asked = metric_outputs(a)
    if a.metrics and not data.has_labels and asked:
        raise ValueError(f"{data.where} has no labels (rgb only), so no metrics and no {' or '.join(asked)}: leave "
                         f"{'them' if len(asked) > 1 else 'it'} out (--export works without labels)")
    baselines = load_baselines(a.baselines, m, device) if a.baselines else {}  # (checked before the long pass)
    print(f"{m.url}: {m.cfg.model.arch}, {m.trained}, {data.num_samples} {a.split} samples from {data.where}", flush=True)
    if note := size_note(m, data):
        print(note, flush=True)
    metrics = None
    if a.metrics and not data.has_labels:
        print(f"no metrics computed: {data.where} has no labels (rgb only)", flush=True)
    elif a.metrics:
        metrics = report_metrics(a, m, baselines, data, device)
    if a.export:
        viz = 8 if a.viz is None else a.viz
        tasks = m.cfg.optim.tasks
        n = export_predictions(m.model, data.dataset, a.export, m.codec, device, m.amp(), a.batch_size, viz, a.overwrite,
                               inputs=inputs, tasks=tasks)
        print(f"exported {n} predictions to {a.export} ({listed_folders(tasks, min(n, viz))}){single_task_note(tasks)}")
    if a.json and metrics is not None:  # (after the export: a failed one leaves no result file that blocks the rerun)
        from mtl.storage import json_bytes, write_bytes_atomic

        write_bytes_atomic(a.json, json_bytes(metrics))  # whole or not at all, as every result file
    return 0


def trained_data(m):  # noqa: ANN001, ANN201 - a LoadedModel; its config
    """The checkpoint's config with its data where training found it: a relative --root names
    other data (or none) from another folder; the checkpoint recorded the absolute place."""
    from dataclasses import replace

    d = m.cfg.data
    if m.data_location is None or not (d.root or d.shards):
        return m.cfg
    return replace(m.cfg, data=replace(d, **{"shards" if d.shards else "root": m.data_location}))


def check_trained_data(m, source, given: str | None) -> None:
    """The data the checkpoint names, when no --root/--shards was given, exists here: it is the
    path training was given, which may be relative to where training ran, or on another machine."""
    from mtl.data.shards import manifest_url
    from mtl.storage import exists

    where = manifest_url(source.url) if source.kind == "shards" else source.url  # (a prefix may not answer: its manifest does)
    if given is None and (m.cfg.data.root or m.cfg.data.shards) and not exists(where):
        flag = "--shards" if source.kind == "shards" else "--root"
        relative = "" if "://" in source.url or os.path.isabs(source.url) else " (relative to where training ran)"
        raise FileNotFoundError(f"{source.url}, the data {m.url} was trained on{relative}, is not here: give the data to "
                                f"evaluate with {flag}")


def size_note(m, data) -> str | None:
    """A line when the split's images are not the size the model trained at: they are evaluated
    at their own size (as the course's grader does), which can cost a model much accuracy, while
    jobs/predict.py resizes photos to the training size."""
    native, trained = data.image_size(), m.input_size
    if native is None or trained is None or tuple(native) == tuple(trained):
        return None
    return (f"note: {m.url} trained at {trained[0]}x{trained[1]}; these {native[0]}x{native[1]} images are evaluated at "
            f"their own size, as the grader does (jobs/predict.py resizes photos to the training size)")


def metric_outputs(a: EvaluateCommand) -> list[str]:
    """The flags given that ask for something made of the metrics."""
    return [flag for flag, value in (("--json", a.json), ("--baselines", a.baselines), ("--as-submitted", a.as_submitted))
            if value]


def check_flags(a: EvaluateCommand) -> None:
    """Usage errors: flags that would otherwise be ignored without a word."""
    from mtl.storage import check_named

    check_named(a.export, "--export")  # (a blank one, an unset variable: not "no export" without a word)
    check_named(a.json, "--json", "file")
    if not a.metrics:
        given = metric_outputs(a)
        if given:
            verb, which = ("reports", "it") if len(given) == 1 else ("report", "one")
            raise ValueError(f"{' and '.join(given)} {verb} metrics, which --no-metrics turns off: leave {which} out")
    if not a.export and a.viz is not None:
        raise ValueError("--viz is for --export, which is not given")
    if a.export and a.json and (_inside(a.json, a.export) or _inside(a.export, a.json)):
        raise ValueError(f"--json {a.json} and --export {a.export} overlap: the export's folder is written whole after the "
                         f"metrics (it would replace the file, or be refused under it); write them apart")
    if a.overwrite and not (a.export or a.json):
        raise ValueError("--overwrite is for --export and --json, neither of which is given")
    if a.batch_size < 1 or a.workers < 0 or (a.viz or 0) < 0:
        raise ValueError(f"--batch-size must be at least 1, --workers and --viz at least 0, got {a.batch_size}, {a.workers} "
                         f"and {a.viz}")


def _inside(path: str, folder: str) -> bool:
    """Whether the local ``path`` is the local ``folder`` or in it (links resolved)."""
    from mtl.storage import is_local

    if not (is_local(path) and is_local(folder)):
        return False
    path, folder = (os.path.realpath(p.removeprefix("file://")) for p in (path, folder))
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def model_url(a: EvaluateCommand) -> str:
    """``--checkpoint`` as loaded. With ``--baselines`` a run folder stands for its ``best.pt``,
    as each baseline's folder does: Δm compares best epochs, and a run folder's latest checkpoint
    can be a later epoch, or a step checkpoint inside one."""
    from mtl.checkpoint import BEST_FILE, STATE_FILE
    from mtl.storage import exists

    url = a.checkpoint.rstrip("/")
    if not a.baselines or url.endswith(".pt") or exists(f"{url}/{STATE_FILE}"):  # (a file, or one checkpoint's folder)
        return a.checkpoint
    if exists(f"{url}/{BEST_FILE}"):
        return f"{url}/{BEST_FILE}"
    print(f"{url} has no {BEST_FILE} (no epoch validated yet?): Δm compares its latest checkpoint", flush=True)
    return a.checkpoint


def load_baselines(urls: tuple[str, ...], m, device) -> dict:
    """task -> the best checkpoint (``best.pt``) of its single-task baseline run. Δm compares
    the model with them on the same images, so they are evaluated on the split and data given
    here, not read from their training-time validation (another split, maybe other data)."""
    from mtl.checkpoint import BEST_FILE
    from mtl.multitask import DELTA_M_METRICS
    from mtl.predict import load_model

    if len(m.cfg.optim.tasks) < 2:
        raise ValueError(f"--baselines: Δm compares a multi-task model with its baselines; {m.url} is itself single-task")
    out = {}
    for url in urls:
        try:
            b = load_model(url if url.endswith(".pt") else f"{url.rstrip('/')}/{BEST_FILE}", device)
        except FileNotFoundError as e:  # (which flag named it: the message alone reads like --checkpoint's)
            raise FileNotFoundError(f"--baselines {url}: {e}") from e
        tasks = tuple(b.cfg.optim.tasks)
        if len(tasks) != 1:
            raise ValueError(f"{url} trained {' and '.join(tasks)}: a Δm baseline is a single-task run (--tasks semseg or --tasks depth)")
        if tasks[0] in out:
            raise ValueError(f"two baselines for {tasks[0]} given ({url} is the second)")
        out[tasks[0]] = b
    missing = [t for t in DELTA_M_METRICS if t not in out]
    if missing:
        raise ValueError(f"--baselines: Δm needs a single-task baseline for {' and '.join(missing)} (a run trained with --tasks {missing[0]})")
    return out


def split_metrics(loaded, data, a: EvaluateCommand, device, baselines: dict | None = None) -> dict:
    """A loaded model's metrics over the whole split, for its own tasks; with ``baselines`` (task
    -> their metrics) also Δm, and the score is -Δm as in training (`mtl.multitask.task_metrics`)."""
    from mtl.engine import evaluate
    from mtl.multitask import task_metrics

    loader = data.loader(a.batch_size, a.workers, pin_memory=device.type == "cuda")
    state = evaluate(loaded.model, loader, loaded.codec, device, loaded.amp(), channels_last=False, submitted=a.as_submitted)
    return task_metrics(state.compute(), loaded.cfg.optim.tasks, baselines)


def report_metrics(a: EvaluateCommand, m, baselines: dict, data, device) -> dict:
    """Print the split's metrics, with Δm against ``baselines`` if any; returns them."""
    from mtl.progress import class_iou_table, metrics_table, wide_console

    base = {task: split_metrics(b, data, a, device) for task, b in baselines.items()}
    metrics = split_metrics(m, data, a, device, base)
    console = wide_console()
    console.print(metrics_table(metrics, f"{a.split} metrics" + (", depth as submitted (4-300 m, 255 codes)" if a.as_submitted else "")))
    classes = class_iou_table(metrics, f"{a.split} IoU per class")
    if classes:
        console.print(classes)
    if baselines:
        scores = ", ".join(f"{t} {b.url} ({'mIoU' if t == 'semseg' else 'SI-logRMSE'} "
                           f"{base[t]['miou' if t == 'semseg' else 'si_log_rmse']:.2f})" for t, b in baselines.items())
        console.print(f"Δm {metrics['delta_m']:+.2f} % against the single-task baselines on the same {a.split} images: {scores} "
                      f"(lower is better)")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
