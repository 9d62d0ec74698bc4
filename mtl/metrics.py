"""The course grader's metrics, with states that can be summed across ranks.

* Segmentation: one confusion matrix over the whole split (ignore 255) -> per-class IoU, mIoU
  over the classes that occur (in the ground truth or the predictions). The course's code
  averages all 19, a class that occurs in neither as 0: the same wherever every class occurs
  (Miniscapes' and Cityscapes' splits); where k of them occur (in the labels or the predictions:
  a class predicted but in no label has IoU 0) its number is k/19 of this.
* Depth: errors per image on its valid pixels, then averaged over images: SI-logRMSE, log-RMSE,
  MAE, RMSE, abs-rel, delta < 1.25^k. Always against the raw ground truth in metres.
* Grader score = mIoU - SI-logRMSE (both in percent units).

`MultiTaskMetrics.state` is one float64 tensor; sum it across ranks (``all_reduce``) and
`compute` the numbers once from the sum.
"""

from __future__ import annotations

import torch

from mtl.data.miniscapes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

DEPTH_KEYS = ("si_log_rmse", "log_rmse", "mae", "rmse", "abs_rel", "delta1", "delta2", "delta3")
PRED_MIN_M = 0.01  # predictions are clamped to this before the log, as the grader does


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """C x C counts, rows = ground truth, columns = prediction; ignore pixels are skipped.

    Ignored pixels go to an overflow bin instead of being filtered out, and the counts are
    scattered, not ``bincount``-ed: both a boolean mask and ``bincount`` read the device on the
    host (a sync per validation batch on a GPU).
    """
    c2 = num_classes * num_classes
    idx = target.long() * num_classes + pred.long().clamp(0, num_classes - 1)
    idx = torch.where(target == IGNORE_INDEX, c2, idx).flatten()
    counts = torch.zeros(c2 + 1, dtype=torch.int64, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
    return counts[:c2].view(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def depth_errors_per_image(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x len(DEPTH_KEYS) errors, B bool: the image has valid depth). Rows of images without
    a valid pixel are zeros and must be left out of the averages (`MultiTaskMetrics` does).

    ``pred`` and ``gt`` are depth in metres (B x H x W); ``valid`` marks usable ground truth.
    Images are weighted, not dropped by boolean indexing, so no host sync is needed.
    """
    pred = pred.double().clamp(min=PRED_MIN_M)
    gt = gt.double()
    valid = valid & (gt > 0)
    n_valid = valid.flatten(1).sum(1)
    has_depth = n_valid > 0
    n = n_valid.clamp(min=1).double()

    def mean(x: torch.Tensor) -> torch.Tensor:  # (where, not a product: a NaN off the valid pixels stays out)
        return torch.where(valid, x, 0.0).flatten(1).sum(1) / n

    safe_gt = torch.where(valid, gt, torch.ones_like(gt))
    d = torch.log(safe_gt) - torch.log(pred)
    ratio = torch.maximum(pred / safe_gt, safe_gt / pred)
    err = pred - gt
    out = [
        100.0 * torch.sqrt((mean(d * d) - mean(d) ** 2).clamp(min=0)),
        torch.sqrt(mean(d * d)),
        mean(err.abs()),
        torch.sqrt(mean(err * err)),
        mean(err.abs() / safe_gt),
        *(100.0 * mean((ratio < 1.25**k).double()) for k in (1, 2, 3)),
    ]
    return torch.where(has_depth[:, None], torch.stack(out, dim=1), 0.0), has_depth


class MultiTaskMetrics:
    """Accumulates segmentation and depth metric states over a split."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        # [confusion (C*C) | n_images | sums of the per-image depth errors]
        self.state = torch.zeros(num_classes * num_classes + 1 + len(DEPTH_KEYS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, semseg_pred: torch.Tensor, depth_pred_m: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """``semseg_pred``: B x H x W class ids; ``depth_pred_m``: B x H x W metres."""
        c2 = self.num_classes**2
        self.state[:c2] += confusion_matrix(semseg_pred, batch["semseg"], self.num_classes).flatten().to(self.state)
        errs, has_depth = depth_errors_per_image(depth_pred_m, batch["depth"], batch["valid"])
        self.state[c2] += has_depth.sum()
        self.state[c2 + 1:] += errs.sum(0).to(self.state)

    def merge(self, other_state: torch.Tensor) -> None:
        self.state += other_state.to(self.state)

    def compute(self) -> dict[str, float]:
        c2 = self.num_classes**2
        ious = iou_from_confusion(self.state[:c2].view(self.num_classes, self.num_classes))
        out: dict[str, float] = {"miou": 100.0 * float(torch.nanmean(ious)) if not torch.isnan(ious).all() else float("nan")}
        n = float(self.state[c2])
        for k, v in zip(DEPTH_KEYS, self.state[c2 + 1:].tolist()):
            out[k] = v / n if n > 0 else float("nan")
        out["grader"] = out["miou"] - out["si_log_rmse"]
        out["num_depth_images"] = n
        for name, v in zip(CLASS_NAMES, ious.tolist()):
            out[f"iou/{name}"] = 100.0 * v
        return out
