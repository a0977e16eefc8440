"""The deviation table of ``histokt collect --compare-paper``: how a study differs from the paper, stated before
any compared number, and the label of each compared matrix ("like for like" or "differs in: …").

Reads what the earlier stages recorded, nothing else: plan.json's ``protocol`` and ``deviations`` (the study's
plan: LRs, where trials start, what cannot be removed) and each done cell's result.json ``deviations`` (its
options and its dataset's store settings; histokt.protocol).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from histokt.protocol import Deviation, merged

COLUMNS = ["scope", "what", "ours", "paper", "cells", "cannot be removed because"]
UNRECORDED = Deviation("unrecorded", "result.json without deviations (written before they were recorded)", "-")
UNPLANNED = Deviation("unrecorded plan", "plan.json without deviations (planned before they were recorded)", "-")


@dataclass
class Deviations:
    """A study's deviations: the plan's, and each compared family's cells' (None: a result without a record)."""

    protocol: str = ""
    study: list[Deviation] = field(default_factory=list)
    cells: dict[str, list[list[Deviation] | None]] = field(default_factory=dict)  # family -> per done cell

    @classmethod
    def of_plan(cls, doc: dict) -> "Deviations":
        recorded = doc.get("deviations")
        study = [Deviation.from_json(d) for d in recorded] if isinstance(recorded, list) else [UNPLANNED]
        return cls(str(doc.get("protocol") or "histokt (not recorded)"), study)

    def add_cell(self, family: str, recorded: list[dict] | None) -> None:
        cells = self.cells.setdefault(family, [])
        cells.append(None if recorded is None else [Deviation.from_json(d) for d in recorded])

    def of_family(self, family: str) -> list[tuple[Deviation, int]]:
        """The deviations of a family's done cells, each with its number of cells."""
        return merged(d if d is not None else [UNRECORDED] for d in self.cells.get(family, []))

    def label(self, family: str) -> str:
        """How a compared matrix stands: like for like (only what cannot be removed), or what differs."""
        removable = [d.what for d in self.study if not d.fixed]
        removable += [d.what for d, _ in self.of_family(family) if not d.fixed]
        if not self.cells.get(family):
            return "no result yet"
        return "like for like" if not removable else "differs in: " + ", ".join(dict.fromkeys(removable))

    def rows(self, families: Sequence[str]) -> list[list[str]]:
        out = [["study", d.what, d.ours, d.paper, "all", d.fixed] for d in self.study]
        for family in families:
            n = len(self.cells.get(family, []))
            out += [[family, d.what, d.ours, d.paper, f"{k}/{n}", d.fixed] for d, k in self.of_family(family)]
        return out

    def markdown(self, families: Sequence[str]) -> str:
        lines = [
            "# Deviations from the paper",
            "",
            f"Protocol: **{self.protocol}**. Every way this study differs from HistoKT as published (docs/method.md), "
            "read from plan.json and each done cell's result.json; 'cells' counts the done cells of the compared "
            "family (its Stage-A and deep-tuned transfer cells) that differ. A compared matrix is like for like "
            "only where nothing but the last column's reasons remain.",
            "",
        ]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows(families)]
        lines += [""] + [f"- `{family}` deep matrix: {self.label(family)}" for family in families] + [""]
        return "\n".join(lines)
