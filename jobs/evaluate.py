"""Evaluate a checkpoint and export predictions in the submission format.

    python jobs/evaluate.py --checkpoint runs/<run>                 # metrics on val
    python jobs/evaluate.py --checkpoint runs/<run>/checkpoints/best.pt --split test --export out/test-preds

``--checkpoint`` takes a checkpoint file or a run folder (its latest checkpoint). The data
defaults to what the checkpoint was trained on (its shards, else its folder, else the cached
synthetic set); ``--data`` names another: a Miniscapes folder or a shard set (a prefix holding
manifest.json, or the manifest's URL). A split without labels (a real test split, rgb only) is
exported without metrics.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder (local or s3://)")
    p.add_argument("--data", default=None, help="Miniscapes folder or shard set, path or URL (default: the checkpoint's)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--export", default=None, help="write submission PNGs + visualisations to this folder")
    p.add_argument("--viz", type=int, default=8, help="number of side-by-side PNGs with --export")
    p.add_argument("--no-metrics", action="store_true", help="skip metrics (a split without labels gets none anyway)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="loader processes for the metrics pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    from mtl.errors import USER_ERRORS, one_line

    try:
        return run(a)
    except USER_ERRORS as e:  # a bad checkpoint, data, flag or output folder: one line naming it
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace) -> int:
    from mtl.data import open_split, resolve_source
    from mtl.engine import evaluate, resolve_device
    from mtl.export import export_predictions
    from mtl.predict import load_model
    from mtl.progress import metrics_table, wide_console

    device = resolve_device(a.device)
    m = load_model(a.checkpoint, device)
    data = open_split(resolve_source(m.cfg, a.data), a.split)
    print(f"{m.url}: {m.cfg.model.arch}, epoch {m.epoch}, {data.num_samples} {a.split} samples from {data.where}", flush=True)
    if not a.no_metrics and not data.has_labels:
        print(f"no metrics computed: {data.where} has no labels (rgb only)", flush=True)
    elif not a.no_metrics:
        loader = data.loader(a.batch_size, a.workers, pin_memory=device.type == "cuda")
        metrics = evaluate(m.model, loader, m.codec, device, m.amp(), channels_last=False).compute()
        wide_console().print(metrics_table(metrics, f"{a.split} metrics"))
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(metrics, fh, indent=1)
    if a.export:
        n = export_predictions(m.model, data.dataset, a.export, m.codec, device, m.amp(), a.batch_size, a.viz, a.overwrite)
        print(f"exported {n} predictions to {a.export} (semseg/, depth/, viz/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
