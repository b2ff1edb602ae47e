"""Segmentation and metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spar_core import (
    IoUAccumulator,
    TextClassifier,
    build_backbone,
    build_classifier,
    feature_fidelity,
    parse_classes,
)
from spar_core.segment import ClassListError, class_logits, predict


def test_parse_classes():
    assert parse_classes("sky, clouds;road\nperson,people\n") == [
        ["sky", "clouds"],
        ["road"],
        ["person", "people"],
    ]
    assert parse_classes(["background", "# comment", "cat"]) == [["background"], ["cat"]]
    with pytest.raises(ClassListError, match="empty"):
        parse_classes(" ; \n")
    with pytest.raises(ClassListError, match="duplicate class name 'Road'"):
        parse_classes("road;car,Road")
    with pytest.raises(ClassListError, match="empty name"):
        parse_classes("road,,street")


def _clf(vectors, owners, classes):
    w = torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)
    return TextClassifier(w, torch.tensor(owners), classes)


def test_synonyms_take_the_max_and_prediction_hand_computed():
    # 3 names in 2 classes: class 0 = {e0}, class 1 = {e1, e2}
    clf = _clf([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0, 1, 1], [["bg"], ["a", "b"]])
    feats = torch.tensor([[[[1.0, 0, 0], [0, 0, 2.0]]]])  # (1, 1, 2, 3): pixel0 -> e0, pixel1 -> e2
    scale = 10.0
    probs = class_logits(feats, clf, (1, 2), logit_scale=scale)
    # pixel 1: logits (0, 0, 10) -> softmax over names; class 1 = max(p1, p2) = p2
    e = math.exp(10)
    assert float(probs[0, 1, 0, 1]) == pytest.approx(e / (e + 2), rel=1e-5)
    assert float(probs[0, 0, 0, 1]) == pytest.approx(1 / (e + 2), rel=1e-5)
    assert predict(feats, clf, (1, 2), logit_scale=scale).tolist() == [[[0, 1]]]


def test_prob_threshold_sets_background():
    clf = _clf([[1, 0], [0, 1], [-1, 0]], [0, 1, 2], [["bg"], ["a"], ["b"]])
    feats = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # pixel1 is ambiguous between bg and a
    scale = 1.0
    pred = predict(feats, clf, (1, 2), logit_scale=scale, prob_thd=0.0)
    assert pred[0, 0, 0] == 1
    # pixel 0 probs: logits (0, 1, 0) -> p(a) = e/(e+2) = 0.576; threshold 0.6 sends it to background
    pred = predict(feats, clf, (1, 2), logit_scale=scale, prob_thd=0.6)
    assert pred[0, 0, 0] == 0


def test_area_threshold_suppresses_small_classes():
    clf = _clf([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0, 1, 2], [["bg"], ["a"], ["b"]])
    # 10 pixels: 1 of class b, 6 of a, 3 of bg
    rows = [[0, 0, 1.0]] + [[0, 1.0, 0]] * 6 + [[1.0, 0.2, 0]] * 3
    feats = torch.tensor([rows])[None]  # (1, 1, 10, 3)
    base = predict(feats, clf, (1, 10), logit_scale=50)
    assert base[0, 0].tolist() == [2] + [1] * 6 + [0] * 3
    pred = predict(feats, clf, (1, 10), logit_scale=50, area_thd=0.15)  # b covers 10% < 15%: suppressed
    assert pred[0, 0, 0] != 2 and pred[0, 0, 1:].tolist() == [1] * 6 + [0] * 3


def test_build_classifier_shapes():
    bb = build_backbone("tiny-clip-64")
    clf = build_classifier(bb, "sky,clouds;road", templates=[lambda c: f"a photo of {c}."])
    assert clf.weights.shape == (3, bb.dim)
    assert clf.name_to_class.tolist() == [0, 0, 1]
    torch.testing.assert_close(clf.weights.norm(dim=-1), torch.ones(3))


def test_miou_hand_computed_confusion():
    acc = IoUAccumulator(3, ignore_index=255)
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 7]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    acc.update(pred, label)
    # valid pixels (label != 255 and < 3): 6. confusion (label, pred): (0,0),(0,1),(1,1),(1,1),(2,2),(2,0)
    # class 0: inter 1, pred area 2, label area 2 -> union 3 ; class 1: inter 2, pred 3, label 2 -> union 3
    # class 2: inter 1, pred 1, label 2 -> union 2
    np.testing.assert_allclose(acc.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert acc.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert acc.out_of_range == 1


def test_miou_accumulates_over_the_set_not_per_image():
    acc = IoUAccumulator(2)
    acc.update(np.array([0, 0]), np.array([0, 0]))
    acc.update(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0]))
    # class 0: inter 2+1 = 3, union (5 label px + 3 pred px - 3) = 5 ; class 1: inter 1, union 3
    np.testing.assert_allclose(acc.iou(), [3 / 5, 1 / 3])
    acc2 = IoUAccumulator(2)
    acc2.merge(acc)
    assert acc2.miou() == acc.miou()


def test_absent_class_is_nan_not_zero():
    acc = IoUAccumulator(3)
    acc.update(np.array([0, 1]), np.array([0, 1]))
    iou = acc.iou()
    assert np.isnan(iou[2]) and acc.miou() == 1.0


def test_feature_fidelity_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    f = feature_fidelity(a, b)
    assert f["mse"] == pytest.approx((0 + 0 + 4 + 4) / 4)
    assert f["cosine"] == pytest.approx((1.0 + 0.0) / 2)
