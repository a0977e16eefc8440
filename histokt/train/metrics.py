"""Evaluation metrics and losses (docs/method.md §3), as pure functions of CPU tensors.

Call them once on the predictions gathered from every rank, not per batch: balanced accuracy is not
an average of per-batch values.
"""

import torch
from torch import nn


def _check_rows(logits: torch.Tensor, labels: torch.Tensor) -> int:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    n = logits.size(0)
    if labels.size(0) != n:
        raise ValueError(f"{n} logit rows but {labels.size(0)} labels")
    if n == 0:
        raise ValueError("no predictions to score")
    return n


def _mean_defined(values) -> float | None:
    """Mean of the entries that are not None (None if there are none)."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def single_label(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 and balanced accuracy for one label per sample.

    ``per_class_acc[c]`` is the recall of class c, or None when c does not occur in ``labels``;
    ``balanced_acc`` averages the defined recalls. Ties in the logits go to the lowest class index.
    """
    n = _check_rows(logits, labels)
    if logits.size(1) != num_classes:
        raise ValueError(f"logits have {logits.size(1)} columns for {num_classes} classes")
    labels = labels.long()
    correct = logits.argmax(dim=1) == labels
    per_class = []
    for c in range(num_classes):
        members = labels == c
        count = int(members.sum())
        per_class.append(int(correct[members].sum()) / count if count else None)
    return {
        "top1": int(correct.sum()) / n,
        "balanced_acc": _mean_defined(per_class),
        "per_class_acc": per_class,
        "n": n,
    }


def multi_label(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Element-wise accuracy over N×C (sigmoid > 0.5), the paper's multi-label "accuracy".

    ``balanced_acc`` = mean over classes of (TPR + TNR) / 2; a class with no positives (or no
    negatives) contributes its TNR (or TPR) alone. ``per_class_acc[c]`` = element-wise accuracy of
    column c.
    """
    n = _check_rows(logits, labels)
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits shape {tuple(logits.shape)}")
    # sigmoid rather than logits > 0, to match the original's threshold exactly (float rounding at 0.5).
    pred = torch.sigmoid(logits.float()) > 0.5
    truth = labels > 0.5
    correct = pred == truth
    per_class, balanced = [], []
    for c in range(logits.size(1)):
        pos, neg = truth[:, c], ~truth[:, c]
        tpr = int((pred[:, c] & pos).sum()) / int(pos.sum()) if pos.any() else None
        tnr = int((~pred[:, c] & neg).sum()) / int(neg.sum()) if neg.any() else None
        per_class.append(int(correct[:, c].sum()) / n)
        balanced.append(_mean_defined([tpr, tnr]))
    return {
        "top1": int(correct.sum()) / correct.numel(),
        "balanced_acc": _mean_defined(balanced),
        "per_class_acc": per_class,
        "n": n,
    }


def multilabel_pos_weights(labels: torch.Tensor) -> torch.Tensor:
    """Class weights w_c = N / positives_c of the training labels [N, C] (float32).

    A class with no positive sample gets weight N (as if it had one) instead of inf, which would
    turn the loss into nan.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, C], got shape {tuple(labels.shape)}")
    n = labels.size(0)
    positives = (labels > 0.5).sum(dim=0).clamp(min=1).to(torch.float64)
    return (n / positives).to(torch.float32)


def loss_fn(multi_label: bool, class_weights: torch.Tensor | None = None) -> nn.Module:
    """CrossEntropyLoss for single-label targets, MultiLabelSoftMarginLoss(weight=...) for multi-label.

    The paper uses plain cross-entropy (no weights, no label smoothing) for single-label datasets and
    weights from ``multilabel_pos_weights`` for ADP and BCSS.
    """
    if multi_label:
        return nn.MultiLabelSoftMarginLoss(weight=class_weights)
    return nn.CrossEntropyLoss(weight=class_weights)
