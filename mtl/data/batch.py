"""Compact loader batches -> model-ready tensors, on the device.

Loaders move uint8 only (5 bytes a pixel instead of 21): rgb NHWC, class ids, disparity codes,
plus, for training, each sample's crop vectors. Here, after the host-to-device copy, the batch is
zoomed/cropped/flipped (`apply_crop`), rgb becomes a normalised float NCHW tensor (NHWC memory
order is channels_last), labels int64, and disparity codes metric depth in metres with a
validity mask, by the Miniscapes formula.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch

from mtl.data.miniscapes import code_to_disparity
from mtl.data.packed import PackedBatch
from mtl.data.transforms import CROP_KEYS, IMAGENET_MEAN, IMAGENET_STD, apply_crop


def codes_to_metres(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 disparity codes -> (depth in metres, float32; 0 where invalid), valid mask."""
    valid = codes > 0
    disp = code_to_disparity(codes.float())
    return torch.where(valid, 1.0 / disp, torch.zeros_like(disp)), valid


@functools.lru_cache(maxsize=None)
def _rgb_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and 1/std in uint8 units, made once per device: building them every step
    would be a blocking host-to-device copy on the hot path."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0)
    return mean, inv_std


def normalize_rgb(rgb_u8_nhwc: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    mean, inv_std = _rgb_stats(rgb_u8_nhwc.device)
    x = (rgb_u8_nhwc.permute(0, 3, 1, 2).float() - mean) * inv_std  # stays in NHWC memory order
    return x if channels_last else x.contiguous()


def to_model_batch(raw: dict[str, torch.Tensor] | PackedBatch, device: torch.device, channels_last: bool = True) -> dict[str, torch.Tensor]:
    """{rgb, semseg, disparity[, aug_*][, index]} uint8 -> {rgb float NCHW, semseg int64, depth m, valid, index};
    a batch with crop vectors (`mtl.data.transforms.draw_crop`) is zoomed, cropped and flipped here.
    A batch of a split without labels ({rgb[, index]}) gives {rgb[, index]}: prediction needs no more.
    A loader's `PackedBatch` goes to the device in one copy; ``index`` stays on the host."""
    if isinstance(raw, PackedBatch):
        raw = raw.to(device, non_blocking=True)
    rgb = normalize_rgb(raw["rgb"].to(device, non_blocking=True), channels_last)
    if "semseg" not in raw:
        if "aug_rows" in raw:
            raise ValueError("a batch without labels cannot carry crop vectors: augmentation is for training only")
        return {"rgb": rgb, **({"index": raw["index"]} if "index" in raw else {})}
    semseg = raw["semseg"].to(device, non_blocking=True)
    codes = raw["disparity"].to(device, non_blocking=True)
    if "aug_rows" in raw:
        crop = {k: raw[k].to(device, non_blocking=True) for k in CROP_KEYS}
        rgb, semseg, codes = apply_crop(rgb, semseg, codes, crop)
        if channels_last:
            rgb = rgb.contiguous(memory_format=torch.channels_last)
    depth, valid = codes_to_metres(codes)
    out = {"rgb": rgb, "semseg": semseg.long(), "depth": depth, "valid": valid}
    if "index" in raw:
        out["index"] = raw["index"]
    return out


def prefetch_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of a GPU that every `DeviceBatches` copies and augments on (each
    epoch's and each validation's): the caching allocator reuses a freed block only for the
    stream that allocated it, so a new stream per iterator (PyTorch hands out 32 in turn) would
    keep up to 32 batches' worth of device memory reserved."""
    return _prefetch_stream(torch.device("cuda", torch.cuda.current_device()) if device.index is None else device)


@functools.lru_cache(maxsize=None)
def _prefetch_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class DeviceBatches:
    """Model batches from an iterator of loader batches, one batch ahead: on CUDA, batch i+1 is
    copied to the device and augmented on a side stream while step i computes, so the copy and
    the resampling kernels leave the compute stream's critical path. On the CPU: a plain map.

    The first batch is fetched on the first ``next()``, not at construction, so creating the
    iterator early (before validation) never waits for the loader.
    """

    def __init__(self, raw_batches: Iterator[dict[str, torch.Tensor]], device: torch.device, channels_last: bool = True) -> None:
        self.raw, self.device, self.channels_last = raw_batches, device, channels_last
        self.stream = prefetch_stream(device) if device.type == "cuda" else None
        self.ahead: dict[str, torch.Tensor] | None = None
        self.started = False

    def _fetch(self) -> dict[str, torch.Tensor] | None:
        raw = next(self.raw, None)
        if raw is None:
            return None
        if self.stream is None:
            return to_model_batch(raw, self.device, self.channels_last)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # reuse of freed memory is ordered
        with torch.cuda.stream(self.stream):
            return to_model_batch(raw, self.device, self.channels_last)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.started:
            self.ahead, self.started = self._fetch(), True
        batch = self.ahead
        if batch is None:
            raise StopIteration
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            for t in batch.values():
                if t.device.type == "cuda":
                    t.record_stream(main)  # made on the side stream, used and freed on the main one
        self.ahead = self._fetch()
        return batch
