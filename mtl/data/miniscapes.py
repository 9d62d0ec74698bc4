"""The Miniscapes format: class table, colour palette and the exact file encodings.

Layout: ``root/{train,val,test}/{rgb,semseg,depth}/<index>.{jpg,png,png}``.
  * rgb:    JPEG, 3 channels.
  * semseg: PNG (mode P or L), 0..18 = Cityscapes eval classes (torchvision order), 255 = ignore.
  * depth:  uint8 PNG of disparity; 0 = invalid; v > 0 maps linearly onto 1/300 .. 1/4 1/m.
"""

from __future__ import annotations

import functools
import io
import typing
import warnings
import zlib

import numpy as np
from PIL import Image

Split = typing.Literal["train", "val", "test"]  # a command line's --split/--splits choices
SPLITS: tuple[str, ...] = typing.get_args(Split)
# A conversion into a Miniscapes folder (data_prep.cityscapes) writes CONVERSION_PLAN first and
# CONVERSION_INDEX last: a folder with the plan and no index is an unfinished conversion (on an
# object store, where the converter writes in place), and readers refuse it.
CONVERSION_PLAN, CONVERSION_INDEX = "conversion.json", "index.csv"
# data_prep.shard's records of finished shards, beside them until the shard set's manifest is out
SHARD_PROGRESS = "_progress"
MODALITIES = {"rgb": "jpg", "semseg": "png", "depth": "png"}
LABEL_MODALITIES = ("semseg", "depth")  # a split has both or neither (a test split: rgb only)


def check_splits(splits: tuple[str, ...]) -> None:
    """ValueError naming --splits when it names no split, an unknown one, or one twice (that
    split would be written twice, by two processes at once, and listed twice)."""
    if not splits:
        raise ValueError(f"--splits names no split: give one or more of {', '.join(SPLITS)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"--splits: unknown split {unknown[0]!r}; expected one of {', '.join(SPLITS)}")
    twice = list(dict.fromkeys(s for s in splits if splits.count(s) > 1))
    if twice:
        raise ValueError(f"--splits names {', '.join(twice)} more than once: give each split once")


def sample_index(stem: str) -> int:
    """A sample's number, from its file stem (a folder) or key (a shard): the stem itself when
    numeric (Miniscapes' ``<index>``), else a checksum of it, the same in every process. It
    seeds the sample's augmentation and names its exported predictions. A number past int64
    (which tensors hold) is checksummed too."""
    if stem.isdigit() and int(stem) < 2**63:
        return int(stem)
    return zlib.crc32(stem.encode()) & 0x7FFFFFFF

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255

# Cityscapes colours of the 19 eval classes, in the order above.
PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)

DEPTH_MIN_M = 4.0
DEPTH_MAX_M = 300.0
_DISP_MIN = 1.0 / DEPTH_MAX_M
_DISP_MAX = 1.0 / DEPTH_MIN_M


def code_to_disparity(code):
    """The Miniscapes formula, the one copy of it: disparity codes 1..255 (a float numpy array
    or torch tensor) -> disparity in 1/m, linear from 1/300 to 1/4. Code 0 (invalid) is the
    caller's to mask."""
    return (_DISP_MAX - _DISP_MIN) * (code - 1.0) / 254.0 + _DISP_MIN


def disparity_to_unit(disp):
    """Disparity in 1/m -> 0..1 over the encodable range (0 at 300 m, 1 at 4 m)."""
    return (disp - _DISP_MIN) / (_DISP_MAX - _DISP_MIN)


def metres_to_code(depth):
    """Depth in metres (a float numpy array or torch tensor) -> the disparity code 1..255 that
    stands for it (as floats), clamped to 4..300 m and rounded half to even (numpy's and torch's
    rounding alike): the one copy of the submission's quantisation."""
    disp = 1.0 / depth.clip(DEPTH_MIN_M, DEPTH_MAX_M)
    return (disparity_to_unit(disp) * 254.0).round() + 1.0


def as_submitted(depth):
    """Depth in metres as a submission PNG gives it back to the grader: clamped to 4..300 m and
    quantised to the 255 disparity codes (numpy array or torch tensor, returned in its dtype).
    Quantised in float64, as `metres_to_disparity_png` writes the PNG: in float32 a depth near a
    code's boundary can round to the next code."""
    if hasattr(depth, "double"):  # (a tensor)
        return (1.0 / code_to_disparity(metres_to_code(depth.double()))).to(depth.dtype)
    depth = np.asarray(depth)
    return (1.0 / code_to_disparity(metres_to_code(depth.astype(np.float64)))).astype(depth.dtype)


def disparity_png_to_metres(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 disparity codes -> (depth in metres as float32, validity mask). Invalid pixels get 0 m."""
    v = np.asarray(v)
    valid = v > 0
    disp = code_to_disparity(v.astype(np.float32))
    depth = np.where(valid, 1.0 / disp, 0.0).astype(np.float32)
    return depth, valid


def metres_to_disparity_png(depth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Depth in metres -> uint8 disparity codes (the inverse of `disparity_png_to_metres`).

    Depth is clamped to 4..300 m (+inf: 300 m); pixels outside ``valid`` become 0 (without
    ``valid``: those with depth <= 0 or not finite). A ``valid`` pixel that is not a number is a
    ValueError: no code stands for it, and 0 would say "no measurement" (a diverged model's output).
    """
    depth = np.asarray(depth, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(depth) & (depth > 0)
    else:
        nan = int(np.isnan(depth[valid]).sum())
        if nan:
            raise ValueError(f"depth is not a number at {nan} pixel(s)")
    return np.where(valid, metres_to_code(np.where(valid, depth, DEPTH_MAX_M)), 0).astype(np.uint8)


def palette_flat() -> list[int]:
    """The 256-entry palette for mode-P semseg PNGs (ignore = black)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:NUM_CLASSES] = PALETTE
    return pal.reshape(-1).tolist()


def colorize_semseg(labels: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 Cityscapes colours (ignore = black)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:NUM_CLASSES] = PALETTE
    return pal[np.asarray(labels, dtype=np.uint8)]


# ---------------------------------------------------------------- raw byte codecs
# Labels and disparities are decoded straight from the PNG's pixel values: a generic image
# decoder (RGB conversion, palette expansion, scaling to float) would change them.
#
# The loader's workers spend most of their time here, so the common files go through
# torchvision's decoders (libjpeg-turbo and libpng through torch ops), which give the same
# pixels as Pillow's, byte for byte (tests/test_encoding.py; gray and CMYK JPEGs too), in about
# 80 % of the time (docs/performance.md: 2.93 -> 2.35 ms a sample at 256x512 on the development
# CPU). Other PNGs, files these decoders refuse, and every error message are Pillow's. torchvision deprecated its image decoders in 0.29
# (for TorchCodec, a compiled package outside this stack); when a release drops them, Pillow
# decodes everything again, with the same results.
_JPEG_MAGIC, _PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


@functools.cache
def _torchvision_io():
    """torchvision's (decode_jpeg, decode_png, ImageReadMode.RGB), or None without them; imported on
    first use, so the codec module itself needs neither torch nor torchvision."""
    try:
        import torchvision.io as tio
        decoders = (tio.decode_jpeg, tio.decode_png, tio.ImageReadMode.RGB)
    except (ImportError, AttributeError):
        return None
    return decoders


def _quiet(decode, *args, **kwargs):
    """A torchvision decoder's result, without its deprecation warning (one per call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode(*args, **kwargs)


def _bytes_tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy: frombuffer wants a writable buffer


def _fast_rgb(data: bytes) -> np.ndarray | None:
    """A JPEG's HxWx3 pixels by torchvision's decoder, or None (not a JPEG, no decoder, or one it
    refuses: Pillow then decodes it or names the error)."""
    tv = _torchvision_io()
    if tv is None or not data.startswith(_JPEG_MAGIC):
        return None
    try:
        return np.ascontiguousarray(_quiet(tv[0], _bytes_tensor(data), mode=tv[2]).permute(1, 2, 0).numpy())
    except RuntimeError:
        return None


def _fast_png_raw(data: bytes) -> np.ndarray | None:
    """An 8-bit gray or palette PNG's raw values by torchvision's decoder, or None for any other
    PNG (other depths and colour types are Pillow's to expand or refuse)."""
    tv = _torchvision_io()
    # IHDR, the first chunk: bit depth at byte 24, colour type at 25 (0 gray, 3 palette)
    if tv is None or not data.startswith(_PNG_MAGIC) or data[12:16] != b"IHDR" or data[24:26] not in (b"\x08\x00", b"\x08\x03"):
        return None
    try:
        out = _quiet(tv[1], _bytes_tensor(data))
    except RuntimeError:
        return None
    return out[0].numpy() if out.shape[0] == 1 else None


# what an rgb file may hold: colour or gray pixels that convert to RGB as they are; an alpha
# channel, 16-bit or float values would be dropped or clipped without a word
_RGB_MODES = ("RGB", "L", "CMYK", "YCbCr")


def why_not_an_image(data: bytes, e: Exception) -> str:
    """PIL's reason, in words about the file: "cannot identify image file <_io.BytesIO object at
    0x7f…>" names a buffer nobody sees."""
    if not data:
        return "the file is empty (0 bytes)"
    if "cannot identify image file" in str(e):
        return f"not an image file: it starts with {bytes(data[:8])!r}"
    return str(e)


def decode_rgb(data: bytes, name: str = "rgb") -> np.ndarray:
    fast = _fast_rgb(data)
    if fast is not None:
        return fast
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", img.size)  # no downscaled JPEG decode, but skips needless work
        mode, fmt = img.mode, img.format
        if mode in _RGB_MODES:
            return np.array(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"{name}: cannot decode RGB JPEG ({why_not_an_image(data, e)})") from e
    raise ValueError(f"{name}: expected an RGB or gray JPEG, got a {fmt} image in mode {mode} (its values would not survive "
                     f"conversion to 8-bit RGB)")


def _decode_png_raw(data: bytes, name: str) -> np.ndarray:
    fast = _fast_png_raw(data)
    if fast is not None:
        return fast
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{name}: cannot decode PNG ({why_not_an_image(data, e)})") from e
    if img.format != "PNG":  # (a lossy JPEG's class ids and disparity codes are off by some)
        raise ValueError(f"{name}: expected a PNG, got a {img.format} image")
    if img.mode not in ("P", "L"):
        raise ValueError(f"{name}: expected a single-channel PNG (mode P or L), got mode {img.mode}")
    return np.array(img)  # mode P gives palette indices, mode L gray values: both raw


def decode_semseg(data: bytes, name: str = "semseg") -> np.ndarray:
    labels = _decode_png_raw(data, name)
    bad = (labels >= NUM_CLASSES) & (labels != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(np.unique(labels[bad]).tolist()))[:8]
        raise ValueError(f"{name}: labels outside 0..{NUM_CLASSES - 1}/255: {values}")
    return labels


def decode_depth(data: bytes, name: str = "depth") -> tuple[np.ndarray, np.ndarray]:
    return disparity_png_to_metres(_decode_png_raw(data, name))


def encode_semseg_png(labels: np.ndarray, compress_level: int = 1) -> bytes:
    img = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    img.putpalette(palette_flat())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_depth_png(depth: np.ndarray, valid: np.ndarray | None = None, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(metres_to_disparity_png(depth, valid), mode="L").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_rgb_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_sample(rgb: bytes, semseg: bytes | None = None, depth: bytes | None = None, key: str = "sample",
                  names: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Decode the files of one sample (checking their sizes agree) into compact arrays:
    ``rgb`` HxWx3 uint8, ``semseg`` HxW uint8 class ids, ``disparity`` HxW uint8 codes (0 =
    invalid). Codes, not metres: 4x smaller to move around, exact under nearest-neighbour
    resampling, and turned into metres on the device (`mtl.data.batch`).

    A sample without labels (a test split: ``semseg`` and ``depth`` both None) gives ``rgb``
    only. ``names`` maps each modality to the name an error should show: the real file (a path,
    or ``<shard url>:<member>``), so that a user can go and look at it; without it, errors say
    ``<key>/<modality>.<ext>``.
    """
    if (semseg is None) != (depth is None):
        raise ValueError(f"{key}: a sample has both labels (semseg and depth) or neither, got only "
                         f"{'semseg' if depth is None else 'depth'}")
    name = {m: (names or {}).get(m, f"{key}/{m}.{ext}") for m, ext in MODALITIES.items()}
    img = decode_rgb(rgb, name["rgb"])
    if semseg is None:
        return {"rgb": img}
    labels = decode_semseg(semseg, name["semseg"])
    codes = _decode_png_raw(depth, name["depth"])
    if not (img.shape[:2] == labels.shape == codes.shape):
        shown = {m: name[m] if names else m for m in MODALITIES}
        raise ValueError(
            f"{key}: image sizes (HxW) disagree: {shown['rgb']} {img.shape[0]}x{img.shape[1]}, "
            f"{shown['semseg']} {labels.shape[0]}x{labels.shape[1]}, {shown['depth']} {codes.shape[0]}x{codes.shape[1]}"
        )
    return {"rgb": img, "semseg": labels.astype(np.uint8, copy=False), "disparity": codes.astype(np.uint8, copy=False)}
