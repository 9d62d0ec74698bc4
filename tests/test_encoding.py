import io

import numpy as np
import pytest
from PIL import Image

from mtl.data.miniscapes import (
    IGNORE_INDEX, decode_depth, decode_rgb, decode_sample, decode_semseg, disparity_png_to_metres, encode_depth_png,
    encode_rgb_jpeg, encode_semseg_png, metres_to_disparity_png,
)


def test_depth_round_trip_within_quantisation():
    depth = np.geomspace(4.0, 300.0, 1000).astype(np.float32).reshape(10, 100)
    back, valid = decode_depth(encode_depth_png(depth))
    assert valid.all()
    # one disparity step is (1/4 - 1/300) / 254; half a step is the worst rounding error
    half_step = (1 / 4 - 1 / 300) / 254 / 2
    assert np.all(np.abs(1 / back - 1 / depth) <= half_step + 1e-7)
    assert back.min() == pytest.approx(4.0, rel=1e-5) and back.max() == pytest.approx(300.0, rel=1e-5)


def test_depth_as_submitted_is_what_the_exported_png_holds():
    """--as-submitted scores the depth the PNG gives back: float32 predictions (a tensor on the
    device, or an array) are quantised as the PNG writer quantises them (in float64), also next
    to a code's rounding boundary."""
    import torch

    from mtl.data.miniscapes import as_submitted

    rng = np.random.default_rng(0)
    depth = np.exp(rng.uniform(np.log(3.0), np.log(320.0), 2_000_000)).astype(np.float32)
    codes = metres_to_disparity_png(depth)
    expected, _ = disparity_png_to_metres(codes)
    for submitted in (as_submitted(torch.from_numpy(depth)).numpy(), as_submitted(depth)):
        assert submitted.dtype == np.float32 and np.array_equal(metres_to_disparity_png(submitted), codes)
        assert np.allclose(submitted, expected, rtol=1e-6, atol=0)


def test_depth_codes_match_the_spec():
    codes = np.array([[0, 1, 128, 255]], np.uint8)
    depth, valid = disparity_png_to_metres(codes)
    assert valid.tolist() == [[False, True, True, True]]
    assert depth[0, 0] == 0
    expected = 1 / ((1 / 4 - 1 / 300) * (128 - 1) / 254 + 1 / 300)
    assert depth[0, 2] == pytest.approx(expected, rel=1e-6)
    assert metres_to_disparity_png(depth, valid).tolist() == codes.tolist()


def test_invalid_depth_stays_invalid():
    depth = np.array([[10.0, 0.0, np.nan, 1000.0, 1.0]], np.float32)
    codes = metres_to_disparity_png(depth)
    assert codes[0, 1] == 0 and codes[0, 2] == 0
    assert codes[0, 3] == 1 and codes[0, 4] == 255  # clamped to 300 m and 4 m
    # a prediction (every pixel valid) that is not a number has no code: 0 would say "no measurement"
    with pytest.raises(ValueError, match="depth is not a number at 1 pixel"):
        metres_to_disparity_png(depth, np.ones(depth.shape, bool))
    assert metres_to_disparity_png(depth, np.isfinite(depth)).tolist() == [[codes[0, 0], 255, 0, 1, 255]]
    far = np.array([[np.inf, 300.0]], np.float32)  # (an overflowed prediction is far, not "not a number")
    assert metres_to_disparity_png(far, np.ones(far.shape, bool)).tolist() == [[1, 1]]


def test_labels_keep_ignore_and_palette_indices():
    labels = np.array([[0, 5, 18, IGNORE_INDEX]], np.uint8)
    assert decode_semseg(encode_semseg_png(labels)).tolist() == labels.tolist()


def test_an_rgb_file_whose_pixels_would_not_survive_is_refused():
    """rgb/ holds JPEGs; a PNG with alpha or 16-bit values under that name would lose them in
    the conversion to 8-bit RGB, so it is named instead (an 8-bit RGB or grey one decodes)."""
    def png(arr, mode=None):
        buf = io.BytesIO()
        Image.fromarray(arr, mode=mode).save(buf, format="PNG")
        return buf.getvalue()

    with pytest.raises(ValueError, match="train/rgb/1.jpg: expected an RGB or gray JPEG, got a PNG image in mode RGBA"):
        decode_rgb(png(np.zeros((4, 4, 4), np.uint8)), "train/rgb/1.jpg")
    with pytest.raises(ValueError, match="mode I;16"):
        decode_rgb(png(np.full((4, 4), 40000, np.uint16)), "train/rgb/1.jpg")
    assert decode_rgb(png(np.full((4, 4, 3), 7, np.uint8))).tolist() == np.full((4, 4, 3), 7).tolist()
    assert decode_rgb(png(np.full((4, 4), 9, np.uint8))).shape == (4, 4, 3)


def test_labels_outside_range_are_rejected():
    with pytest.raises(ValueError, match=r"x/semseg.png: labels outside 0..18/255: \[19, 200\]"):
        decode_semseg(encode_semseg_png(np.array([[0, 19, 200]], np.uint8)), "x/semseg.png")


def test_rgb_label_png_is_rejected():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="s.png: expected a single-channel PNG"):
        decode_semseg(buf.getvalue(), "s.png")


@pytest.mark.parametrize("fmt", ["JPEG", "BMP"])
def test_a_label_file_that_is_not_a_png_is_rejected(fmt):
    """A gray JPEG named depth/0.png would decode, its codes off by a few (lossy): refused."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8), "L").save(buf, format=fmt)
    with pytest.raises(ValueError, match=f"d.png: expected a PNG, got a {fmt} image"):
        decode_depth(buf.getvalue(), "d.png")


def test_size_mismatch_names_the_sample():
    rgb = encode_rgb_jpeg(np.zeros((8, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"train/7: image sizes \(HxW\) disagree: rgb 8x16, semseg 8x16, depth 8x8"):
        decode_sample(rgb, encode_semseg_png(np.zeros((8, 16), np.uint8)), encode_depth_png(np.full((8, 8), 10.0)), "train/7")


def test_an_empty_or_non_image_file_is_said_so():
    """PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" names a buffer: the
    message says what the file is instead."""
    with pytest.raises(ValueError, match=r"^a/rgb.jpg: cannot decode RGB JPEG \(the file is empty \(0 bytes\)\)$"):
        decode_rgb(b"", "a/rgb.jpg")
    with pytest.raises(ValueError, match=r"^a/semseg.png: cannot decode PNG \(not an image file: it starts with b'<html><b'\)$"):
        decode_semseg(b"<html><body>404</body></html>", "a/semseg.png")


def test_corrupt_file_is_named():
    with pytest.raises(ValueError, match="a/rgb.jpg: cannot decode RGB JPEG"):
        decode_rgb(b"junk", "a/rgb.jpg")
    with pytest.raises(ValueError, match="a/depth.png: cannot decode PNG"):
        decode_depth(b"junk", "a/depth.png")


def _pillow_only(monkeypatch):
    from mtl.data import miniscapes

    monkeypatch.setattr(miniscapes, "_torchvision_io", lambda: None)


def test_torchvision_decodes_the_same_pixels_as_pillow(monkeypatch):
    """The loader decodes JPEGs and 8-bit gray/palette PNGs with torchvision (faster); Pillow
    decodes everything else and is the fallback without torchvision's decoders: both must give
    the same arrays, byte for byte, or a resumed run would not see the data it started with."""
    from mtl.data import miniscapes
    from mtl.data.synthetic import render_scene

    rng = np.random.default_rng(3)
    samples = []
    for h, w in ((64, 128), (96, 160), (256, 512)):
        scene = render_scene(h, w, rng)
        gray = io.BytesIO()
        Image.fromarray(scene.labels, mode="L").save(gray, format="PNG")
        samples.append((encode_rgb_jpeg(scene.rgb), encode_semseg_png(scene.labels), encode_depth_png(scene.depth), gray.getvalue()))
    assert all(miniscapes._fast_rgb(s[0]) is not None and miniscapes._fast_png_raw(s[1]) is not None for s in samples)
    fast = [(decode_sample(*s[:3]), decode_semseg(s[3])) for s in samples]
    _pillow_only(monkeypatch)
    slow = [(decode_sample(*s[:3]), decode_semseg(s[3])) for s in samples]
    for (a, a_gray), (b, b_gray) in zip(fast, slow):
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
        assert np.array_equal(a_gray, b_gray) and np.array_equal(a_gray, a["semseg"])
        assert a["rgb"].flags.c_contiguous


def test_pngs_of_other_bit_depths_are_pillows_to_read_or_refuse():
    labels = np.arange(16, dtype=np.uint8).reshape(2, 8)
    four_bit = io.BytesIO()
    img = Image.fromarray(labels, mode="P")
    img.putpalette(list(range(48)))
    img.save(four_bit, format="PNG", bits=4)
    assert four_bit.getvalue()[24] == 4  # IHDR: a 4-bit palette, whose raw indices torchvision would scale
    assert decode_semseg(four_bit.getvalue()).tolist() == labels.tolist()
    one_bit = io.BytesIO()
    Image.fromarray(labels > 7).convert("1").save(one_bit, format="PNG")
    with pytest.raises(ValueError, match="d.png: expected a single-channel PNG .* got mode 1"):
        decode_depth(one_bit.getvalue(), "d.png")


@pytest.mark.parametrize("decoder", ["torchvision", "pillow"])
def test_a_truncated_file_is_an_error_naming_it(decoder, monkeypatch):
    if decoder == "pillow":
        _pillow_only(monkeypatch)
    jpeg = encode_rgb_jpeg(np.full((16, 32, 3), 90, np.uint8))
    with pytest.raises(ValueError, match="a/rgb.jpg: cannot decode RGB JPEG"):
        decode_rgb(jpeg[: len(jpeg) // 2], "a/rgb.jpg")
    png = encode_semseg_png(np.zeros((16, 32), np.uint8))
    with pytest.raises(ValueError, match="a/semseg.png: cannot decode PNG"):
        decode_semseg(png[: len(png) // 2], "a/semseg.png")
