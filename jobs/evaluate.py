"""Evaluate a checkpoint and export predictions in the submission format.

    python jobs/evaluate.py --checkpoint runs/<run>                 # metrics on val
    python jobs/evaluate.py --checkpoint runs/<run>/best.pt --split test --export out/test-preds
    python jobs/evaluate.py --checkpoint runs/<mtl run> --baselines runs/<semseg-only run> runs/<depth-only run>  # + Δm

``--checkpoint`` takes a checkpoint file or a run folder (its latest checkpoint). The data
defaults to what the checkpoint was trained on (its shards, else its folder, else the cached
synthetic set); ``--root`` names another Miniscapes folder and ``--shards`` another shard set (a
prefix holding manifest.json, or the manifest's URL), as in training (``--data``: either). A
split without labels (a real test split, rgb only) is exported without metrics.
"""

from __future__ import annotations

import json
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
    export: str | None = None  # write submission PNGs + visualisations to this folder
    viz: int = 8  # side-by-side PNGs with --export
    metrics: bool = True  # compute metrics (a split without labels gets none anyway)
    batch_size: int = 8  # images per forward pass
    workers: int = 0  # loader processes for the metrics pass
    device: Device = "auto"  # auto: the GPU if there is one
    json: str | None = None  # also write the metrics to this JSON file
    #: single-task baseline run folders (one trained with --tasks semseg, one with --tasks depth): also
    #: report Δm, the mean relative change against them in percent (lower is better; mtl.multitask)
    baselines: tuple[str, ...] = ()
    overwrite: bool = False  # replace a non-empty --export folder


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
    from mtl.engine import evaluate, resolve_device
    from mtl.export import export_predictions
    from mtl.predict import load_model
    from mtl.multitask import delta_m, read_baselines, task_metrics
    from mtl.progress import class_iou_table, metrics_table, wide_console

    from mtl.atomic import output_dir
    from mtl.storage import write_bytes_atomic

    if a.export:
        output_dir(a.export, a.overwrite)  # (checked before the long pass; again when written)
    device = resolve_device(a.device)
    m = load_model(a.checkpoint, device)
    baselines = read_baselines(a.baselines) if a.baselines else None  # (checked before the long pass)
    if baselines and len(m.cfg.optim.tasks) < 2:
        raise ValueError(f"--baselines: Δm compares a multi-task model with its baselines; {a.checkpoint} is itself single-task")
    data = open_split(resolve_source(m.cfg, a.data), a.split)
    print(f"{m.url}: {m.cfg.model.arch}, epoch {m.epoch}, {data.num_samples} {a.split} samples from {data.where}", flush=True)
    if a.metrics and not data.has_labels:
        print(f"no metrics computed: {data.where} has no labels (rgb only){'; no --json written' if a.json else ''}", flush=True)
    elif a.metrics:
        loader = data.loader(a.batch_size, a.workers, pin_memory=device.type == "cuda")
        metrics = task_metrics(evaluate(m.model, loader, m.codec, device, m.amp(), channels_last=False).compute(), m.cfg.optim.tasks)
        if baselines:
            metrics["delta_m"] = delta_m(metrics, baselines)
        console = wide_console()
        console.print(metrics_table(metrics, f"{a.split} metrics"))
        classes = class_iou_table(metrics, f"{a.split} IoU per class")
        if classes:
            console.print(classes)
        if baselines:
            console.print(f"Δm {metrics['delta_m']:+.2f} % against the single-task baselines {', '.join(a.baselines)} (lower is better)")
        if a.json:  # whole or not at all, as every result file
            write_bytes_atomic(a.json, json.dumps(metrics, indent=1).encode())
    if a.export:
        n = export_predictions(m.model, data.dataset, a.export, m.codec, device, m.amp(), a.batch_size, a.viz, a.overwrite)
        print(f"exported {n} predictions to {a.export} (semseg/, depth/, viz/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
