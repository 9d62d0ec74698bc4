"""Predictions for arbitrary RGB images (any size; jpg, jpeg or png), and the checkpoint ->
model step that every tool shares (`load_model`: jobs/evaluate.py and jobs/predict.py).

The network sees each image at its input size (the size it was trained at, recorded in the
checkpoint as ``input_size``, else ``size``); its outputs are resized back to the image's own
size, so every prediction lines up with its photo pixel for pixel:

* segmentation: the logits are resized bilinearly, then the argmax is taken (smoother, more
  accurate borders than resizing the labels with nearest neighbour);
* depth: the network's output is resized bilinearly in its own space (normalised log or
  linear depth), then decoded to metres with `mtl.losses.DepthCodec`.

    labels_and_depths = predict_images("runs/<run>", ["a.jpg", "b.png"])
    predict_to_folder("runs/<run>", "s3://bucket/photos", "out/")   # OUT/{semseg,depth,viz}/<stem>.png
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from mtl.atomic import atomic_dir
from mtl.checkpoint import TrainState, load_checkpoint
from mtl.config import ExperimentConfig, parse_size
from mtl.data.batch import normalize_rgb
from mtl.data.miniscapes import why_not_an_image
from mtl.engine import autocast, resolve_device
from mtl.export import OUTPUT_FOLDERS, make_output_folders, write_prediction
from mtl.losses import DepthCodec
from mtl.models import build_model, resolve
from mtl.runs import stored_config
from mtl.storage import missing_bucket, storage_errors, url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# labels HxW uint8, depth HxW float32 metres; None for a task the model was not trained on (--tasks)
Prediction = tuple[np.ndarray | None, np.ndarray | None]


@dataclass
class LoadedModel:
    """A checkpoint's model in eval mode on its device, with what predicting needs besides."""

    model: nn.Module
    codec: DepthCodec
    url: str
    cfg: ExperimentConfig
    epoch: int | None = None  # epochs completed
    input_size: tuple[int, int] | None = None  # (H, W) the network was trained at, when recorded
    epoch_step: int = 0  # a step checkpoint's steps into epoch ``epoch + 1``
    data_location: str | None = None  # where its training data was (absolute), when recorded

    @property
    def trained(self) -> str:
        """How far its training got, for a person: "epoch 2", "3 steps into epoch 2"."""
        done = self.epoch or 0
        return f"{self.epoch_step} steps into epoch {done + 1}" if self.epoch_step else f"epoch {done}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def amp(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.train.bf16)


def load_model(checkpoint: str, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a checkpoint file or run folder (local or any fsspec URL), in eval mode.

    The architecture comes from the checkpoint's own config; its ``pretrained`` encoder path
    is dropped, since the checkpoint's weights replace those anyway and the file may not be
    reachable where one evaluates. Raises FileNotFoundError / ValueError naming the checkpoint.
    """
    state = load_checkpoint(checkpoint)
    url = state["url"]
    try:
        if "model" not in state["config"]:  # (else the default architecture, and a misleading "does not fit")
            raise KeyError("config.model")
        cfg = stored_config(state["config"])
        weights = state["model"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {url} lacks a usable config or model ({type(e).__name__}: {e})") from e
    except ValueError as e:  # (its messages name flags; these values come from the file: say so)
        raise ValueError(f"checkpoint {url}: its stored config cannot be used by this version of streetmtl ({e})") from e
    model = build_model(replace(cfg.model, pretrained=None))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {url} does not fit architecture {cfg.model.arch}: {e}") from e
    trained = TrainState.of(state)
    size = trained.input_size
    device = resolve_device(device) if isinstance(device, str) else device
    return LoadedModel(model.to(device).eval(), DepthCodec(resolve(cfg.model).depth_space), url, cfg, trained.epoch or None,
                       (int(size[0]), int(size[1])) if size else None, trained.epoch_step, trained.data_location)


def model_input_size(loaded: LoadedModel, size: tuple[int, int] | str | None = None) -> tuple[int, int]:
    """The size the network sees: the checkpoint's recorded ``input_size`` (what it was trained
    at), else ``size``; an error naming ``--size`` when there is neither."""
    if loaded.input_size:
        return loaded.input_size
    if size is None:
        raise ValueError(f"checkpoint {loaded.url} does not record the input size it was trained at: "
                         f"pass --size HxW (size= in Python), e.g. the size of the images it was validated on")
    return parse_size(size) if isinstance(size, str) else parse_size(f"{size[0]}x{size[1]}")


def find_images(url: str) -> list[str]:
    """The images named by ``url``: the file itself, or the .jpg/.jpeg/.png files directly in the
    folder (dot-files left out), in natural order. Raises FileNotFoundError when there are none
    and ValueError when two would be written under the same name."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        if fs.isdir(path):
            names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
            found = [f"{url.rstrip('/')}/{n}" for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
        elif fs.exists(path):
            if not url.lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(f"{url} is not a {'/'.join(IMAGE_EXTENSIONS)} image")
            found = [url]
        else:
            raise FileNotFoundError(missing_bucket(url) or f"no such image file or folder: {url}")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {url}")
    return sorted(check_unique_stems(found), key=lambda f: _natural_key(image_stem(f)))


def image_stem(url: str) -> str:
    return os.path.splitext(os.path.basename(url.rstrip("/")))[0]


def check_unique_stems(urls: Sequence[str]) -> list[str]:
    """Outputs are named by file stem: ``a.jpg`` and ``a.png`` (or two folders' ``0.jpg``) would
    overwrite each other's predictions. ValueError naming both."""
    stems: dict[str, str] = {}
    for u in urls:
        other = stems.setdefault(image_stem(u), u)
        if other != u:
            raise ValueError(f"{other} and {u} would both be written as {image_stem(u)}.png: rename one")
    return list(urls)


def _natural_key(stem: str) -> tuple[int, int, str]:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def read_image(url: str) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB, upright as its EXIF orientation says (RGBA loses its
    alpha, grey and palette images are expanded). Errors name the file, also one whose values 8
    bits cannot hold (16-bit or float grey: converting would clip it to white)."""
    with storage_errors(url):
        fs, path = url_to_fs(url)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {url}") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        fmt = img.format
        img = ImageOps.exif_transpose(img)  # a phone photo's pixels as viewers show it (EXIF Orientation)
        if not img.mode.startswith(("I", "F")):
            return np.array(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"{url}: cannot decode image ({why_not_an_image(data, e)})") from e
    raise ValueError(f"{url}: a {fmt} image in mode {img.mode} (more than 8 bits per value): save it as an 8-bit image")


@torch.no_grad()
def predict_arrays(loaded: LoadedModel, rgbs: Sequence[np.ndarray], size: tuple[int, int]) -> list[Prediction]:
    """One batch: each HxWx3 uint8 image resized to ``size`` (bilinear with antialias, rounded
    back to uint8 as if it were a file of that size, then normalised exactly as in training),
    predicted together, and each output resized back to its image's size (module docstring)."""
    device, model = loaded.device, loaded.model
    x = torch.stack([_resize_rgb(torch.from_numpy(np.ascontiguousarray(r)).to(device), size) for r in rgbs])
    with loaded.amp():
        out = model(normalize_rgb(x, channels_last=False))
    logits, depth = out["semseg"][-1], out["depth"][-1][:, :1]
    tasks = loaded.cfg.optim.tasks
    results = []
    for j, rgb in enumerate(rgbs):
        hw = tuple(rgb.shape[:2])
        labels = _labels(logits[j:j + 1].float(), hw) if "semseg" in tasks else None
        metres = loaded.codec.decode(_resize(depth[j:j + 1].float(), hw)[0, 0]) if "depth" in tasks else None
        results.append((None if labels is None else labels.cpu().numpy(), None if metres is None else metres.float().cpu().numpy()))
    return results


#: class scores upscaled at once by `_labels` (64 MiB of float32): all 19 of a 48-megapixel
#: photo's would take 3.6 GB, an out-of-memory error on a small GPU or a laptop
_BAND_VALUES = 1 << 24


def _labels(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The classes (H x W uint8) of 1 x C x h x w ``logits`` upscaled bilinearly to ``hw`` (as
    `F.interpolate` does, align_corners=False), a band of rows at a time: bilinear is separable,
    so the columns are upscaled first, at the network's few rows, then each band of rows is
    blended from the two source rows around it, as interpolate places them."""
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits.argmax(1)[0].to(torch.uint8)
    (c, h), (height, width) = logits.shape[1:3], hw
    wide = F.interpolate(logits, size=(h, width), mode="bilinear", align_corners=False)[0]  # C x h x W
    out = torch.empty(hw, dtype=torch.uint8, device=logits.device)
    step = max(1, _BAND_VALUES // (c * width))
    for r0 in range(0, height, step):
        rows = torch.arange(r0, min(height, r0 + step), device=logits.device, dtype=torch.float32)
        src = ((rows + 0.5) * (h / height) - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=h - 1)
        i1, frac = (i0 + 1).clamp(max=h - 1), (src - i0)[:, None]
        out[r0:r0 + len(rows)] = (wide[:, i0] * (1 - frac) + wide[:, i1] * frac).argmax(0).to(torch.uint8)
    return out


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == hw else F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def _resize_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """HxWx3 uint8 -> size[0] x size[1] x 3 uint8; antialiased, so a large photo shrunk to the
    network's size does not alias into patterns the network never saw."""
    if tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    x = F.interpolate(rgb.permute(2, 0, 1)[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def _as_loaded(model_or_checkpoint: LoadedModel | nn.Module | str, device: torch.device | str | None,
               codec: DepthCodec | None) -> LoadedModel:
    """A checkpoint (file or run folder), a `LoadedModel`, or a bare module plus its ``codec``."""
    if isinstance(model_or_checkpoint, LoadedModel):
        return model_or_checkpoint
    if isinstance(model_or_checkpoint, str):
        return load_model(model_or_checkpoint, device or "auto")
    if codec is None:
        raise ValueError("a bare model needs its depth codec: pass codec=DepthCodec(<its depth space>)")
    model = model_or_checkpoint.eval()
    if device is not None:
        model.to(resolve_device(device) if isinstance(device, str) else device)
    return LoadedModel(model, codec, type(model).__name__, ExperimentConfig())


def _batches(items: Sequence, n: int) -> Iterator[Sequence]:
    if n < 1:
        raise ValueError(f"batch_size must be at least 1, got {n}")
    for i in range(0, len(items), n):
        yield items[i:i + n]


def predict_images(model_or_checkpoint: LoadedModel | nn.Module | str, images: str | Sequence[str | np.ndarray],
                   size: tuple[int, int] | str | None = None, batch_size: int = 4, device: torch.device | str | None = None,
                   codec: DepthCodec | None = None) -> list[Prediction]:
    """(labels HxW uint8, depth HxW float32 metres) for each image, at the image's own size; a
    single-task model's other task is None (its head never learned).

    ``images``: a folder, file or URL (`find_images`), or a list of paths/URLs and HxWx3 uint8
    arrays. ``model_or_checkpoint``: a checkpoint file or run folder, a `load_model` result,
    or a bare module (then ``codec`` is required). ``size``: the network's input size when the
    checkpoint does not record one (`model_input_size`).
    """
    loaded = _as_loaded(model_or_checkpoint, device, codec)
    hw = model_input_size(loaded, size)
    items = find_images(images) if isinstance(images, str) else list(images)
    results: list[Prediction] = []
    for chunk in _batches(list(enumerate(items)), batch_size):
        results += predict_arrays(loaded, [_as_rgb(x, i) for i, x in chunk], hw)
    return results


def _as_rgb(item: str | np.ndarray, i: int) -> np.ndarray:
    if isinstance(item, str):
        return read_image(item)
    a = np.asarray(item)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"image {i}: expected an HxWx3 uint8 array, got shape {a.shape} {a.dtype}")
    return a


def predict_to_folder(model_or_checkpoint: LoadedModel | nn.Module | str, images: str | Sequence[str], out_dir: str,
                      size: tuple[int, int] | str | None = None, batch_size: int = 4, device: torch.device | str | None = None,
                      viz: int = 8, overwrite: bool = False, codec: DepthCodec | None = None) -> int:
    """Predict every image and write ``out_dir/semseg/<stem>.png`` (palette PNG of class ids),
    ``out_dir/depth/<stem>.png`` (uint8 disparity, the dataset's encoding) and, for the first
    ``viz``, ``out_dir/viz/<stem>.png``; returns the count. A single-task model writes its own
    task's folder only (`mtl.export.output_folders`).

    The folder appears whole or not at all (`mtl.atomic.atomic_dir`): an unreadable image half
    way leaves no folder that looks finished, a non-empty ``out_dir`` is refused unless
    ``overwrite``, and one holding an input image or the checkpoint always. Images are read a
    batch at a time, so memory does not grow with their number.
    """
    loaded = _as_loaded(model_or_checkpoint, device, codec)
    hw = model_input_size(loaded, size)
    urls = find_images(images) if isinstance(images, str) else check_unique_stems(images)
    n = 0
    checkpoint = [] if isinstance(model_or_checkpoint, nn.Module) else [loaded.url]  # (a bare module's "url" is its class)
    with atomic_dir(out_dir, overwrite, [*urls, *checkpoint], OUTPUT_FOLDERS) as tmp:
        make_output_folders(tmp, loaded.cfg.optim.tasks, viz > 0)
        for chunk in _batches(urls, batch_size):
            rgbs = [read_image(u) for u in chunk]
            for url, rgb, (labels, depth_m) in zip(chunk, rgbs, predict_arrays(loaded, rgbs, hw)):
                write_prediction(tmp, image_stem(url), labels, depth_m, rgb if n < viz else None)
                n += 1
    return n
