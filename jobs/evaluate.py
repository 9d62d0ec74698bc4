"""Evaluate a checkpoint and export predictions in the submission format.

    python jobs/evaluate.py --checkpoint runs/<run>                 # metrics on val
    python jobs/evaluate.py --checkpoint runs/<run>/checkpoints/best.pt --split test --export out/test-preds

``--checkpoint`` takes a checkpoint file or a run folder (its latest checkpoint). ``--data``
defaults to the dataset the checkpoint was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder (local or s3://)")
    p.add_argument("--data", default=None, help="Miniscapes root (default: the checkpoint's)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--export", default=None, help="write submission PNGs + visualisations to this folder")
    p.add_argument("--viz", type=int, default=8, help="number of side-by-side PNGs with --export")
    p.add_argument("--no-metrics", action="store_true", help="skip metrics (e.g. a test split without labels)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)

    from mtl.checkpoint import load_checkpoint
    from mtl.config import ExperimentConfig
    from mtl.data import data_root
    from mtl.data.folder import MiniscapesFolder
    from mtl.data.loader import make_loader
    from mtl.engine import autocast, evaluate, resolve_device
    from mtl.export import export_predictions
    from mtl.losses import DepthCodec
    from mtl.models import build_model, resolve
    from mtl.progress import metrics_table, wide_console

    console, errors = wide_console(), wide_console(stderr=True)
    try:
        state = load_checkpoint(a.checkpoint)
        cfg = ExperimentConfig.from_dict(state["config"])
        model = build_model(cfg.model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {state['url']} does not fit architecture {cfg.model.arch}: {e}") from e
        dataset = MiniscapesFolder(a.data or data_root(cfg), a.split)
    except (FileNotFoundError, ValueError) as e:
        errors.print(f"[red]error:[/] {e}")
        return 2
    device = resolve_device(a.device)
    model.to(device)
    codec, amp = DepthCodec(resolve(cfg.model).depth_space), autocast(device, cfg.train.bf16)
    console.print(f"{state['url']}: {cfg.model.arch}, epoch {state['epoch']}, {len(dataset)} {a.split} samples")
    if not a.no_metrics:
        loader = make_loader(dataset, a.batch_size, False, 0, 0, 2, drop_last=False)
        metrics = evaluate(model, loader, codec, device, amp, channels_last=False).compute()
        console.print(metrics_table(metrics, f"{a.split} metrics"))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(metrics, fh, indent=1)
    if a.export:
        try:
            n = export_predictions(model, dataset, a.export, codec, device, amp, a.batch_size, a.viz, a.overwrite)
        except FileExistsError as e:
            errors.print(f"[red]error:[/] {e}")
            return 2
        console.print(f"exported {n} predictions to {a.export} (semseg/, depth/, viz/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
