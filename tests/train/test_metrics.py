"""Metrics and losses on hand-computed small cases (4 samples, 3 classes)."""

import math

import pytest
import torch
from torch import nn

from histokt.train.metrics import loss_fn, multi_label, multilabel_pos_weights, single_label

# Multi-label case. Predictions (logit > 0) and truths:
#   pred  [[1,0,1],[0,0,1],[1,1,0],[0,1,0]]
#   truth [[1,0,0],[1,0,1],[1,0,0],[0,0,0]]
ML_LOGITS = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, 3.0], [2.0, 1.0, -2.0], [-3.0, 1.0, -1.0]])
ML_LABELS = torch.tensor([[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0]])


def test_single_label_hand_case():
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.0],  # pred 0
            [1.0, 1.0, 0.0],  # tie -> lowest index, pred 0
            [0.0, 3.0, 1.0],  # pred 1
            [1.0, 0.0, 0.5],
        ]
    )  # pred 0
    labels = torch.tensor([0, 0, 0, 2])
    out = single_label(logits, labels, 3)
    assert out["n"] == 4
    assert out["top1"] == pytest.approx(2 / 4)
    # class 0: 2 of 3 right; class 1 absent; class 2: 0 of 1
    assert out["per_class_acc"][0] == pytest.approx(2 / 3)
    assert out["per_class_acc"][1] is None
    assert out["per_class_acc"][2] == 0.0
    assert out["balanced_acc"] == pytest.approx((2 / 3 + 0) / 2)


def test_single_label_perfect_and_shape_errors():
    logits = torch.eye(3)
    out = single_label(logits, torch.arange(3), 3)
    assert out["top1"] == out["balanced_acc"] == 1.0 and out["per_class_acc"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        single_label(logits, torch.arange(3), 4)
    with pytest.raises(ValueError):
        single_label(logits, torch.arange(2), 3)
    with pytest.raises(ValueError):
        single_label(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3)


def test_multi_label_hand_case():
    out = multi_label(ML_LOGITS, ML_LABELS)
    assert out["n"] == 4
    assert out["top1"] == pytest.approx(8 / 12)  # one wrong entry per row: 4 of 12
    assert out["per_class_acc"] == pytest.approx([3 / 4, 2 / 4, 3 / 4])
    # col 0: TPR 2/3, TNR 1/1; col 1: no positives -> TNR 2/4 alone; col 2: TPR 1/1, TNR 2/3
    expected = ((2 / 3 + 1) / 2 + 2 / 4 + (1 + 2 / 3) / 2) / 3
    assert out["balanced_acc"] == pytest.approx(expected)
    assert expected == pytest.approx(13 / 18)


def test_multi_label_threshold_is_sigmoid_above_half():
    # logit 0 -> sigmoid exactly 0.5 -> negative
    out = multi_label(torch.tensor([[0.0, 0.1]]), torch.tensor([[0.0, 1.0]]))
    assert out["top1"] == 1.0
    with pytest.raises(ValueError):
        multi_label(ML_LOGITS, ML_LABELS[:, :2])


def test_multilabel_pos_weights():
    w = multilabel_pos_weights(ML_LABELS)  # positives per class: 3, 0, 1
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([4 / 3, 4.0, 4.0]))
    assert torch.isfinite(w).all()


def test_loss_fn_kinds_and_values():
    assert isinstance(loss_fn(False), nn.CrossEntropyLoss)
    assert loss_fn(False).weight is None
    # CE of equal logits over 2 classes = log 2
    assert loss_fn(False)(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(math.log(2))

    weights = torch.tensor([2.0, 1.0])
    ml = loss_fn(True, weights)
    assert isinstance(ml, nn.MultiLabelSoftMarginLoss)
    # each entry costs log 2 at logit 0; weighted mean over C = (2 + 1) log 2 / 2
    value = ml(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item()
    assert value == pytest.approx(1.5 * math.log(2))


def test_weighted_multilabel_loss_matches_formula():
    w = multilabel_pos_weights(ML_LABELS)
    y = ML_LABELS.float()
    logsig = torch.nn.functional.logsigmoid
    per_entry = -(y * logsig(ML_LOGITS) + (1 - y) * logsig(-ML_LOGITS)) * w
    expected = per_entry.mean(dim=1).mean()
    assert loss_fn(True, w)(ML_LOGITS, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_multi_label_class_without_negatives_counts_its_tpr_alone():
    # column 0: all positive, TPR 1/2 (no TNR); column 1: all negative, TNR 2/2 (no TPR)
    out = multi_label(torch.tensor([[1.0, -1.0], [-1.0, -2.0]]), torch.tensor([[1, 0], [1, 0]]))
    assert out["per_class_acc"] == [0.5, 1.0]
    assert out["balanced_acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["top1"] == pytest.approx(3 / 4) and out["n"] == 2


def test_multi_label_truth_is_above_half():
    # a soft label of exactly 0.5 is a negative: predicted negative (logit -1) is right
    out = multi_label(torch.tensor([[-1.0]]), torch.tensor([[0.5]]))
    assert out["top1"] == 1.0 and out["per_class_acc"] == [1.0]


def test_single_label_counts_rows_not_entries_and_accepts_float_labels():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = single_label(logits, torch.tensor([1.0, 1.0, 1.0]), 2)
    assert out["top1"] == pytest.approx(2 / 3) and out["n"] == 3
    assert out["per_class_acc"] == [None, pytest.approx(2 / 3)]
    assert out["balanced_acc"] == pytest.approx(2 / 3)  # the mean over the one class that occurs
