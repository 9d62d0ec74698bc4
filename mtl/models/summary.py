"""Parameters and forward GFLOPs of every architecture, next to the report's numbers.

    python -m mtl.models.summary [--encoder resnet34] [--size 256x512]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtl.config import ModelConfig, Size
from mtl.models import ARCHITECTURES, build_model
from mtl.zoo_names import Encoder

# The report's parameter counts (ResNet34, 19 classes) and its best validation numbers per model.
REPORT = {
    "deeplabv3p": dict(params=26_166_708, result="IoU 84.42, SI-log 20.09, grader 64.34 (Table 8)"),
    "branched": dict(params=31_002_644, result="IoU 84.76, SI-log 18.12, grader 66.64 (Table 8)"),
    "distillation": dict(params=34_588_712, result="IoU 85.33, SI-log 17.26, grader 68.07 (Table 9)"),
    "branched_vortex": dict(params=32_070_180, result="final model (§5.2.3): IoU 86.98, SI-log 15.29, grader 71.70 with log depth (run 058); test 76.51 from its longest run (072)"),
}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Forward FLOPs of one image (multiply-add = 2 FLOPs), counted by torch's flop counter."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 1e9


@dataclass(frozen=True)
class SummaryCommand:
    encoder: Encoder = "resnet34"  # the backbone of every architecture
    size: Size = (256, 512)  # image size HxW for the FLOP count


def main(argv: list[str] | None = None) -> None:
    from mtl.cli import parse

    a = parse(SummaryCommand, argv, description=__doc__)
    size = a.size
    print(f"| architecture | parameters ({a.encoder}) | report | GFLOPs/image at {size[0]}x{size[1]} | report's result |")
    print("|---|---:|---:|---:|---|")
    for arch in ARCHITECTURES.names:
        m = build_model(ModelConfig(arch=arch, encoder=a.encoder))
        r = REPORT.get(arch, {})
        print(f"| `{arch}` | {count_params(m):,} | {r.get('params', 0):,} | {forward_gflops(m, size):.1f} | {r.get('result', '')} |")


if __name__ == "__main__":
    main()
