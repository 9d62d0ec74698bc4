"""Pictures a person can look at: colourised labels and depth, side by side."""

from __future__ import annotations

import numpy as np

from mtl.data.miniscapes import DEPTH_MAX_M, DEPTH_MIN_M, colorize_semseg, disparity_to_unit
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# anchors of a perceptually ordered colour map (magma-like), far = dark, near = bright
_ANCHORS = np.array([(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)], np.float32)


def colorize_depth(depth_m: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Depth in metres -> HxWx3 uint8 by inverse depth (near bright); invalid pixels grey."""
    depth_m = np.asarray(depth_m, np.float32)
    if valid is None:
        valid = depth_m > 0
    disp = 1.0 / np.clip(np.where(valid, depth_m, DEPTH_MAX_M), DEPTH_MIN_M, DEPTH_MAX_M)
    t = disparity_to_unit(disp)
    t = np.sqrt(t) * (len(_ANCHORS) - 1)  # sqrt spreads the far range, where most pixels are
    lo = np.clip(np.floor(t).astype(int), 0, len(_ANCHORS) - 2)
    frac = (t - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    rgb[~valid] = 96
    return rgb.astype(np.uint8)


def denormalize_rgb(rgb: np.ndarray) -> np.ndarray:
    """3xHxW ImageNet-normalised float -> HxWx3 uint8."""
    x = rgb.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def side_by_side(rgb: np.ndarray, pred_labels: np.ndarray | None, pred_depth: np.ndarray | None,
                 gt_labels: np.ndarray | None = None, gt_depth: np.ndarray | None = None,
                 gt_valid: np.ndarray | None = None) -> np.ndarray:
    """Top row: rgb | semseg GT | semseg prediction. Bottom row: rgb | depth GT | depth prediction.
    Missing ground truth is drawn black; a task not predicted (None: a single-task model's
    untrained head) has no row."""
    blank = np.zeros_like(rgb)
    rows = []
    if pred_labels is not None:
        rows.append([rgb, colorize_semseg(gt_labels) if gt_labels is not None else blank, colorize_semseg(pred_labels)])
    if pred_depth is not None:
        rows.append([rgb, colorize_depth(gt_depth, gt_valid) if gt_depth is not None else blank, colorize_depth(pred_depth)])
    return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
