"""Synthetic Miniscapes: plausible street scenes written in the exact Miniscapes layout.

A pinhole camera 1.5 m above a flat road looks down the street. Ground depth follows the
ground-plane geometry, facades are planes beside the sidewalks, cars/persons/poles stand on the
ground at a depth consistent with where they touch it, and a z-buffer resolves occlusions, so
depth is consistent with class and position. Colours and textures correlate with the class.
Sky and the ego-vehicle hood are invalid depth; the hood is labelled 255 (ignore).

Part of the library (not of ``data_prep``): the synthetic set is a data source training falls
back to (`mtl.data.build.synthetic_root` caches it). The command line is ``python -m
data_prep.synthesize``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from mtl.atomic import atomic_dir
from mtl.data.miniscapes import (
    DEPTH_MAX_M, DEPTH_MIN_M, IGNORE_INDEX, MODALITIES, SPLITS, encode_depth_png, encode_rgb_jpeg, encode_semseg_png,
)
from mtl.machine import check_workers, usable_cpus, worker_pool

#: what the generator renders, as a number: bump it when a change alters the scenes of a given
#: seed, so that sets cached by an earlier version (`mtl.data.build.synthetic_root`) are not reused
GENERATOR_VERSION = 1

# class ids (torchvision's Cityscapes eval order)
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS = range(16)
BICYCLE = 18

# Per-class base colour and texture strength: correlated with the class, not equal to the palette.
_COLOUR = {
    ROAD: (90, 88, 95), SIDEWALK: (165, 150, 160), BUILDING: (120, 105, 95), WALL: (150, 140, 120),
    FENCE: (130, 120, 100), POLE: (80, 80, 80), LIGHT: (200, 150, 40), SIGN: (210, 200, 40),
    VEG: (60, 120, 40), TERRAIN: (130, 160, 90), SKY: (140, 180, 230), PERSON: (170, 60, 70),
    RIDER: (200, 40, 40), CAR: (40, 50, 130), TRUCK: (50, 60, 80), BUS: (40, 90, 110), BICYCLE: (120, 30, 50),
}
_TEXTURE = {ROAD: 10, SIDEWALK: 14, BUILDING: 18, VEG: 30, TERRAIN: 22, SKY: 4, CAR: 12}

CAM_HEIGHT_M = 1.5


@dataclass(frozen=True)
class Scene:
    labels: np.ndarray  # HxW uint8
    depth: np.ndarray  # HxW float32 metres, 0 = invalid
    rgb: np.ndarray  # HxWx3 uint8


def render_scene(h: int, w: int, rng: np.random.Generator) -> Scene:
    """One scene of ``h`` x ``w`` pixels; deterministic given ``rng``'s state."""
    f = 0.8 * w  # focal length in pixels
    y_h = h * rng.uniform(0.36, 0.5)  # horizon row
    vx = w * rng.uniform(0.4, 0.6)  # vanishing point column
    cam = _Camera(h, w, f, y_h, vx, np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :])
    labels, zbuf, road_half, walk = _ground(cam, rng)
    for side in (-1.0, 1.0):
        _facade(cam, side, road_half + walk + rng.uniform(0.0, 1.5), labels, zbuf, rng)
    for obj in _objects(road_half, walk, rng):
        _draw_object(cam, obj, labels, zbuf)
    depth = np.where(np.isfinite(zbuf), np.minimum(zbuf, DEPTH_MAX_M), 0.0).astype(np.float32)
    depth[depth < DEPTH_MIN_M] = 0.0  # closer than the stereo range: invalid
    depth[_noise(h, w, rng) > 2.33] = 0.0  # sparse stereo holes (~1 % of pixels)
    if rng.random() < 0.5:  # ego-vehicle hood: ignore label, invalid depth
        hood = cam.yy >= h * rng.uniform(0.9, 0.96) + 0.02 * h * np.cos((cam.xx - vx) / w * np.pi)
        labels[np.broadcast_to(hood, labels.shape)] = IGNORE_INDEX
        depth[np.broadcast_to(hood, depth.shape)] = 0.0
    return Scene(labels=labels, depth=depth, rgb=_paint(labels, cam.yy, cam.xx, rng))


@dataclass(frozen=True)
class _Camera:
    h: int
    w: int
    f: float  # focal length, pixels
    y_h: float  # horizon row
    vx: float  # vanishing point column
    yy: np.ndarray  # row coordinates, Hx1
    xx: np.ndarray  # column coordinates, 1xW


def _ground(cam: _Camera, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Sky above the horizon; below it the ground plane (road, sidewalks, terrain), its depth
    from the row and its lateral offset from the column. Returns labels, z-buffer, the road's
    half width and the sidewalks' width (metres)."""
    yy, xx = cam.yy, cam.xx
    below = yy > cam.y_h + 0.5
    z_ground = np.where(below, cam.f * CAM_HEIGHT_M / np.maximum(yy - cam.y_h, 0.5), np.inf).astype(np.float32)
    lateral = (xx - cam.vx) * CAM_HEIGHT_M / np.maximum(yy - cam.y_h, 0.5)
    road_half = rng.uniform(3.5, 7.0)
    walk = rng.uniform(2.0, 4.0)
    ground_cls = np.where(np.abs(lateral) < road_half, ROAD, np.where(np.abs(lateral) < road_half + walk, SIDEWALK, TERRAIN))
    labels = np.where(below, ground_cls, np.full((cam.h, cam.w), SKY, np.uint8)).astype(np.uint8)
    zbuf = np.where(below, z_ground, np.full((cam.h, cam.w), np.inf, np.float32))
    return labels, zbuf, road_half, walk


def _facade(cam: _Camera, side: float, xb: float, labels: np.ndarray, zbuf: np.ndarray, rng: np.random.Generator) -> None:
    """The facade plane at lateral distance ``xb`` on one side: blocks of varying height, some
    of them trees. Drawn in place where nearer than what is there."""
    dx = (cam.xx - cam.vx) * side
    z_fac = np.where(dx > 1.0, cam.f * xb / np.maximum(dx, 1.0), np.inf).astype(np.float32)
    block = (np.minimum(z_fac, 1e4) / rng.uniform(10, 25)).astype(np.int64) % 64
    heights = rng.uniform(6.0, 30.0, size=64).astype(np.float32)
    is_tree = rng.random(64) < 0.3
    top = cam.y_h - cam.f * (heights[block] - CAM_HEIGHT_M) / z_fac
    facade = (cam.yy >= top) & (z_fac < zbuf) & (z_fac < DEPTH_MAX_M)
    labels[...] = np.where(facade, np.where(is_tree[block], VEG, BUILDING), labels)
    zbuf[...] = np.where(facade, z_fac, zbuf)


def _objects(road_half: float, walk: float, rng: np.random.Generator) -> list[tuple]:
    """(class, depth, lateral offset, width, height[, lift]) of the objects standing on the ground."""
    objects = []
    for _ in range(rng.integers(2, 7)):  # cars on the road
        objects.append((CAR, rng.uniform(6, 70), rng.uniform(-road_half + 1, road_half - 1), 1.8, 1.5))
    for _ in range(rng.integers(0, 5)):  # persons on the sidewalk
        objects.append((PERSON, rng.uniform(5, 45), rng.choice([-1, 1]) * (road_half + rng.uniform(0.3, walk)), 0.6, 1.75))
    for _ in range(rng.integers(1, 4)):  # poles with a sign at the curb
        x_p = rng.choice([-1, 1]) * (road_half + 0.3)
        z_p = rng.uniform(6, 60)
        objects.append((POLE, z_p, x_p, 0.25, 5.0))
        objects.append((SIGN, z_p - 0.05, x_p, 0.8, 0.8, 4.2))
    return objects


def _draw_object(cam: _Camera, obj: tuple, labels: np.ndarray, zbuf: np.ndarray) -> None:
    """An upright rectangle at constant depth, through the z-buffer."""
    cls, z, xl, ow, oh = obj[:5]
    lift = obj[5] if len(obj) > 5 else 0.0
    bottom = cam.y_h + cam.f * (CAM_HEIGHT_M - lift) / z
    top, left, right = bottom - cam.f * oh / z, cam.vx + cam.f * (xl - ow / 2) / z, cam.vx + cam.f * (xl + ow / 2) / z
    r0, r1 = int(max(0, np.floor(top))), int(min(cam.h, np.ceil(bottom)))
    c0, c1 = int(max(0, np.floor(left))), int(min(cam.w, np.ceil(right)))
    if r1 <= r0 or c1 <= c0:
        return
    zb = zbuf[r0:r1, c0:c1]
    hit = zb > z
    labels[r0:r1, c0:c1][hit] = cls
    zb[hit] = z


_NOISE_TILES: dict[tuple[int, int], np.ndarray] = {}


def _noise(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random HxW window of a fixed per-size noise tile: per-pixel texture without drawing
    H*W normal variates for every image (deterministic: the tile has a fixed seed)."""
    tile = _NOISE_TILES.get((h, w))
    if tile is None:
        tile = _NOISE_TILES[(h, w)] = np.random.default_rng(12345).standard_normal((2 * h, 2 * w), dtype=np.float32)
    y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
    return tile[y:y + h, x:x + w]


def _paint(labels: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = labels.shape
    lut = np.zeros((256, 3), np.float32)
    tex = np.zeros(256, np.float32)
    for c, col in _COLOUR.items():
        lut[c] = np.clip(np.array(col) * rng.uniform(0.85, 1.15, 3), 0, 255)
        tex[c] = _TEXTURE.get(c, 10) / 110.0
    lut[IGNORE_INDEX] = (30, 30, 35)
    # one brightness factor per pixel: texture noise, windows on buildings, the sky's gradient
    shade = tex[labels] * _noise(h, w, rng)
    shade += 1.0
    yi, xi = yy.astype(np.int32), xx.astype(np.int32)
    shade[(labels == BUILDING) & ((xi // 7 + yi // 9) % 3 == 0)] *= 0.6
    sky = labels == SKY
    shade *= np.where(sky, 0.8 + 0.4 * (yy / h), 1.0)
    shade *= rng.uniform(0.75, 1.2)  # global exposure
    img = lut[labels]
    img *= shade[..., None]
    # dashed lane marks: dash phase from the row's perspective depth (rows, not pixels: cheap)
    dist = np.maximum(yy - h / 3, 1.0)
    dash = (np.floor(h * 2.0 / dist) % 2 == 0)
    lane = (labels == ROAD) & (np.abs(xx - w / 2) < 0.02 * dist) & dash
    img[lane] = 235
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


# ------------------------------------------------------------------------------ writing

def _write_chunk(args: tuple[str, str, int, int, int, int, int]) -> int:
    root, split, start, stop, h, w, seed = args
    split_id = SPLITS.index(split)
    for i in range(start, stop):
        sc = render_scene(h, w, np.random.default_rng([seed, split_id, i]))
        files = {
            "rgb": encode_rgb_jpeg(sc.rgb),
            "semseg": encode_semseg_png(sc.labels),
            "depth": encode_depth_png(sc.depth, sc.depth > 0),
        }
        for mod, data in files.items():
            with open(os.path.join(root, split, mod, f"{i}.{MODALITIES[mod]}"), "wb") as fh:
                fh.write(data)
    return stop - start


MIN_SIDE = 16  # (a scene's road, cars and sky need that many pixels)


def synthesize(out: str, counts: dict[str, int], size: tuple[int, int] = (256, 512), seed: int = 0,
               workers: int | None = None, overwrite: bool = False, progress: bool = False) -> str:
    """Write a synthetic Miniscapes dataset to the local folder ``out``.

    The dataset is built in a sibling temporary folder and renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete. Deterministic given ``seed``.
    """
    h, w = size
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"--size must be at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")
    for split, n in counts.items():
        if split not in SPLITS or n < 0:
            raise ValueError(f"--{split} must be at least 0, got {n}" if split in SPLITS else f"no split {split!r}: {SPLITS}")
    if not sum(counts.values()):
        raise ValueError(f"nothing to write: {', '.join(f'--{split}' for split in counts)} are all 0")
    if seed < 0:
        raise ValueError(f"--seed must be at least 0, got {seed}")
    check_workers(workers)
    workers = workers or min(usable_cpus(), 8)
    with atomic_dir(out, overwrite) as tmp:
        for split in counts:
            for mod in MODALITIES:
                os.makedirs(os.path.join(tmp, split, mod))
        jobs = [(tmp, split, s, min(s + 16, n), h, w, seed) for split, n in counts.items() for s in range(0, n, 16)]
        if workers > 1 and len(jobs) > 1:
            with worker_pool(workers) as pool:
                _track(pool.map(_write_chunk, jobs), sum(counts.values()), progress)
        else:
            _track(map(_write_chunk, jobs), sum(counts.values()), progress)
    return os.path.abspath(out)


def _track(done, total: int, progress: bool) -> None:
    if not progress:
        for _ in done:
            pass
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn("synthesizing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn())
    with Progress(*cols) as bar:
        task = bar.add_task("synth", total=total, rate="-")
        t0 = time.perf_counter()
        for n in done:
            bar.advance(task, n)
            rate = bar.tasks[0].completed / max(time.perf_counter() - t0, 1e-6)
            bar.update(task, rate=f"{rate:.0f}")
