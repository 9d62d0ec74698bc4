import math

import pytest
import torch

from mtl.metrics import MultiTaskMetrics, confusion_matrix, depth_errors_per_image, iou_from_confusion


def _batch(labels, depth, valid=None):
    depth = torch.as_tensor(depth, dtype=torch.float32)
    return {"semseg": torch.as_tensor(labels), "depth": depth, "valid": depth > 0 if valid is None else torch.as_tensor(valid)}


def test_perfect_prediction():
    labels = torch.tensor([[[0, 1], [2, 255]]])
    depth = torch.tensor([[[5.0, 10.0], [20.0, 0.0]]])
    m = MultiTaskMetrics()
    m.update(labels.clamp(max=18), depth, _batch(labels, depth))
    r = m.compute()
    assert r["miou"] == pytest.approx(100.0)
    assert r["si_log_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert r["mae"] == pytest.approx(0.0) and r["rmse"] == pytest.approx(0.0) and r["abs_rel"] == pytest.approx(0.0)
    assert r["delta1"] == pytest.approx(100.0)
    assert r["grader"] == pytest.approx(100.0)


def test_ignore_pixels_do_not_count():
    target = torch.tensor([[0, 0, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1]])
    conf = confusion_matrix(pred, target)
    assert conf.sum() == 2 and conf[0, 0] == 1 and conf[0, 1] == 1
    ious = iou_from_confusion(conf)
    assert ious[0] == pytest.approx(0.5) and ious[1] == pytest.approx(0.0)  # class 1: predicted, never true
    assert torch.isnan(ious[2:]).all()  # absent classes are left out of the mean


def test_constant_prediction_hand_computed():
    # one image, valid gt 2 and 8 (and an invalid pixel), constant prediction 4
    gt = torch.tensor([[[2.0, 8.0, 0.0]]])
    pred = torch.full_like(gt, 4.0)
    errs, _ = depth_errors_per_image(pred, gt, gt > 0)
    e = errs[0]
    d = torch.log(torch.tensor([2.0, 8.0])) - math.log(4.0)  # [-ln2, ln2]
    si = 100 * math.sqrt(float((d**2).mean() - d.mean() ** 2))
    assert e[0].item() == pytest.approx(si)  # 100 * ln 2
    assert e[1].item() == pytest.approx(math.log(2))  # log-RMSE
    assert e[2].item() == pytest.approx(3.0)  # MAE: |4-2|, |4-8|
    assert e[3].item() == pytest.approx(math.sqrt((4 + 16) / 2))
    assert e[4].item() == pytest.approx((2 / 2 + 4 / 8) / 2)  # abs-rel
    assert e[5:].tolist() == [0.0, 0.0, 0.0]  # ratio 2 exceeds 1.25, 1.5625 and 1.953


def test_delta_thresholds():
    gt = torch.full((1, 1, 3), 10.0)
    errs, _ = depth_errors_per_image(torch.tensor([[[11.0, 14.0, 19.0]]]), gt, gt > 0)  # ratios 1.1, 1.4, 1.9
    e = errs[0]
    assert e[5:].tolist() == pytest.approx([100 / 3, 200 / 3, 100.0])


def test_scale_shifted_depth_has_zero_si_log():
    gt = torch.rand(2, 8, 8) * 50 + 5
    e, _ = depth_errors_per_image(gt * 3.7, gt, torch.ones_like(gt, dtype=torch.bool))
    assert e[:, 0].abs().max().item() < 1e-4
    assert e[:, 2].min().item() > 1.0  # but MAE sees the scale error


def test_predictions_are_clamped_before_log():
    gt = torch.tensor([[[10.0, 10.0]]])
    e, _ = depth_errors_per_image(torch.tensor([[[-5.0, 0.0]]]), gt, gt > 0)
    assert torch.isfinite(e).all()
    assert e[0, 1].item() == pytest.approx(math.log(10 / 0.01))


def test_depth_is_averaged_per_image_not_per_pixel():
    gt = torch.tensor([[[10.0, 10.0, 10.0, 10.0]], [[10.0, 0.0, 0.0, 0.0]]])
    pred = torch.tensor([[[10.0, 10.0, 10.0, 10.0]], [[20.0, 1.0, 1.0, 1.0]]])
    m = MultiTaskMetrics()
    m.update(torch.zeros(2, 1, 4, dtype=torch.long), pred, _batch(torch.zeros(2, 1, 4, dtype=torch.long), gt))
    assert m.compute()["mae"] == pytest.approx((0 + 10) / 2)  # per pixel it would be 10/5 = 2


def test_images_without_valid_depth_are_skipped():
    gt = torch.tensor([[[0.0, 0.0]], [[10.0, 10.0]]])
    pred = torch.tensor([[[1.0, 1.0]], [[20.0, 20.0]]])
    errs, has_depth = depth_errors_per_image(pred, gt, gt > 0)
    assert has_depth.tolist() == [False, True] and errs[0].abs().sum() == 0 and torch.isfinite(errs).all()
    m = MultiTaskMetrics()
    m.update(torch.zeros(2, 1, 2, dtype=torch.long), pred, _batch(torch.zeros(2, 1, 2, dtype=torch.long), gt))
    r = m.compute()
    assert r["num_depth_images"] == 1 and r["mae"] == pytest.approx(10.0)  # the empty image counts for nothing


def test_a_nan_prediction_off_the_valid_pixels_stays_out():
    """Masks select, they do not multiply: NaN·0 is NaN, and one NaN in an image without depth
    (or on an invalid pixel) would make the split's averages NaN."""
    gt = torch.tensor([[[0.0, 10.0]], [[0.0, 0.0]]])
    pred = torch.tensor([[[float("nan"), 20.0]], [[float("nan"), 1.0]]])
    errs, has_depth = depth_errors_per_image(pred, gt, gt > 0)
    assert has_depth.tolist() == [True, False] and torch.isfinite(errs).all()
    assert errs[0, 2] == pytest.approx(10.0) and errs[1].abs().sum() == 0  # (mae)


def test_states_sum_across_ranks():
    torch.manual_seed(0)
    labels = torch.randint(0, 19, (4, 8, 8))
    gt = torch.rand(4, 8, 8) * 40 + 4
    pred_l, pred_d = torch.randint(0, 19, (4, 8, 8)), torch.rand(4, 8, 8) * 40 + 4
    whole = MultiTaskMetrics()
    whole.update(pred_l, pred_d, _batch(labels, gt))
    a, b = MultiTaskMetrics(), MultiTaskMetrics()
    a.update(pred_l[:1], pred_d[:1], _batch(labels[:1], gt[:1]))
    b.update(pred_l[1:], pred_d[1:], _batch(labels[1:], gt[1:]))
    a.merge(b.state)
    ra, rw = a.compute(), whole.compute()
    for k in ("miou", "si_log_rmse", "mae", "grader"):
        assert ra[k] == pytest.approx(rw[k])


def test_the_metrics_table_shows_abs_rel_to_three_decimals():
    """abs-rel is a fraction: two decimals would show 0.197 and 0.199 alike."""
    from rich.console import Console

    from mtl.progress import metrics_table

    console = Console(width=200, record=True)
    console.print(metrics_table({"miou": 49.291, "abs_rel": 0.1974, "rmse": 7.456}, "val"))
    text = console.export_text()
    assert "0.197" in text and "49.29" in text and "7.46" in text
