"""A transfer matrix: one init family and tuning mode of a study, as the collector tables and draws it.

Rows are source datasets, columns are target datasets; the cell (source, target) is the source's model tuned
on the target, and the diagonal (source == target) is the target's own Stage A of that family (random init, or
ImageNet init, trained on the target alone). Every value is a Stat over the seeds of one cell at the target's
chosen LR (fractions, as result.json stores them): None where the cell was planned but has no result yet
(shown as MISSING), absent where it was never planned. The collector (histokt.results.collect) builds it and writes its
text tables; histokt.results.figures writes its LaTeX table and heatmap.
"""

import statistics
from dataclasses import dataclass

MISSING = "—"


@dataclass(frozen=True)
class Stat:
    """Top-1 over a group of seeds, as fractions: n, mean best validation, mean test, sample std of test."""

    n: int
    valid: float
    test: float
    std: float | None  # ddof=1; None when n < 2

    @classmethod
    def of(cls, pairs):
        valid, test = [v for v, _ in pairs], [t for _, t in pairs]
        std = statistics.stdev(test) if len(test) > 1 else None
        return cls(len(pairs), statistics.fmean(valid), statistics.fmean(test), std)


@dataclass
class Matrix:
    """One transfer matrix (init family, mode); every top-1 a Stat of fractions, None where planned but missing."""

    init: str
    mode: str
    rows: list  # sources (and targets, so every target has its diagonal row)
    cols: list  # targets
    lr: dict  # target -> chosen LR (None: no results yet)
    cells: dict  # (source, target) -> Stat | None, planned transfers only
    diag: dict  # target -> Stat | None, planned Stage-A cells only

    @property
    def name(self) -> str:
        return f"matrix_{self.init}_{self.mode}"

    def at(self, s, t):
        """(planned, Stat or None) of one cell; the diagonal is the target's Stage A."""
        table, key = (self.diag, t) if s == t else (self.cells, (s, t))
        return key in table, table.get(key)

    def gain(self, s, t):
        """Test top-1 gain over the target's diagonal, in points; None where either is missing."""
        cell, base = self.cells.get((s, t)), self.diag.get(t)
        return None if cell is None or base is None else 100 * (cell.test - base.test)


def title(m: Matrix) -> str:
    """The matrix's heading: "Random init, deep-tuning", "ImageNet init, fine-tuning"."""
    init = {"random": "Random", "imagenet": "ImageNet"}.get(m.init, m.init)
    return f"{init} init, {m.mode}-tuning"


def diag_text(init: str) -> str:
    """What the diagonal of an ``init`` family's matrix is, in words."""
    if init == "imagenet":
        return "ImageNet init trained on the target (ImageNet → target)"
    return f"{init}-init Stage A trained on the target alone"
