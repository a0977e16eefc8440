"""Typed records of the standardize pipeline, each with the JSON it is written as.

The worklist (``staging/worklist.json``) lists the sources with their split and the parts to do; a
part's manifest lists its kept patches; ``standardize()`` returns a ``StandardizeResult``. The JSON of
each record is the same lists and dicts as before the records were typed, so fingerprints, staging
folders and stores are unchanged.
"""

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

from histokt.ingest.cards.base import Label

# busy: this process could do nothing, every part left to it is being written by other live processes
Status = Literal["written", "done", "repaired", "partial", "busy", "finalizing elsewhere"]


def label_to_json(label: Label) -> int | list[int] | None:
    """A multi-hot tuple becomes a JSON list; a class index or None stays as it is."""
    return list(label) if isinstance(label, tuple) else label


def label_from_json(value: int | list[int] | None) -> Label:
    return tuple(value) if isinstance(value, list) else value


class SourceRow(NamedTuple):
    """One source of the worklist; JSON ``[path, label, partition, group, split]``."""

    path: str
    label: Label
    partition: str
    group: str
    split: str | None  # None under --split-rule patch: the split is cut after tiling

    def to_json(self) -> list:
        return [self.path, label_to_json(self.label), self.partition, self.group, self.split]

    @classmethod
    def from_json(cls, row: list) -> "SourceRow":
        path, label, partition, group, split = row
        return cls(path, label_from_json(label), partition, group, split)


class PatchRow(NamedTuple):
    """One kept patch in a part's manifest; JSON ``[source, x0, y0, x1, y1, label, partition, split]``."""

    source: int  # index of its source in the worklist
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in the rescaled, padded image
    label: Label
    partition: str
    split: str | None

    def to_json(self) -> list:
        return [self.source, *self.box, label_to_json(self.label), self.partition, self.split]

    @classmethod
    def from_json(cls, row: list) -> "PatchRow":
        source, x0, y0, x1, y1, label, partition, split = row
        return cls(source, (x0, y0, x1, y1), label_from_json(label), partition, split)


@dataclass(frozen=True)
class PartManifest:
    """A finished part: its kept patches and rejected sources. The part's data file holds the patches'
    content one after another, unpadded (patch k: ``content[k]`` = (h, w) pixels, C-order RGB bytes,
    CRC32C ``crc32c[k]``)."""

    patches: list[PatchRow]
    rejected: list[dict[str, str]]  # {"path", "reason"}
    content: list[tuple[int, int]]
    crc32c: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "patches": [p.to_json() for p in self.patches],
            "rejected": self.rejected,
            "content": [list(c) for c in self.content],
            "crc32c": self.crc32c,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "PartManifest":
        # a manifest of an older histokt (no content, no checksums) reads as incomplete: the part is redone
        content = [(int(h), int(w)) for h, w in doc.get("content", [])]
        return cls([PatchRow.from_json(p) for p in doc["patches"]], doc["rejected"], content, doc.get("crc32c", []))

    @property
    def complete(self) -> bool:
        return len(self.content) == len(self.crc32c) == len(self.patches)

    @property
    def nbytes(self) -> int:
        """The size its data file must have."""
        return sum(h * w * 3 for h, w in self.content)


@dataclass(frozen=True)
class Worklist:
    """Everything decided before any pixel is read: the settings, the sources with their split, the parts."""

    fingerprint: str
    settings: dict[str, Any]
    classes: list[str]
    multi_label: bool
    group_rule: str
    warnings: list[str]
    sources: list[SourceRow]
    parts: list[tuple[int, int]]  # [first, end) source indices of each part

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "classes": self.classes,
            "multi_label": self.multi_label,
            "group_rule": self.group_rule,
            "warnings": self.warnings,
            "sources": [s.to_json() for s in self.sources],
            "parts": [list(p) for p in self.parts],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Worklist":
        return cls(
            fingerprint=doc["fingerprint"],
            settings=doc["settings"],
            classes=doc["classes"],
            multi_label=doc["multi_label"],
            group_rule=doc["group_rule"],
            warnings=doc["warnings"],
            sources=[SourceRow.from_json(s) for s in doc["sources"]],
            parts=[(a, b) for a, b in doc["parts"]],
        )


@dataclass(frozen=True)
class StandardizeResult:
    """What one ``standardize()`` call did; ``to_json`` leaves out the fields that do not apply."""

    dataset: str
    status: Status
    counts: dict[str, int] | None = None  # written, done: patches per split
    rejected: int | None = None  # written: sources rejected as bad images
    parts_missing: int | None = None  # partial, busy: parts other shards (or processes) still have to do
    parts_held: int | None = None  # partial, busy: parts of this shard that other live processes are writing
    held_by: list[str] | None = None  # partial, busy: their holders ("host h, pid p, job j, 12 s ago")
    lock: str | None = None  # finalizing elsewhere: the lock's holder, or "released"
    repaired: list[str] | None = None  # repaired: the shard files re-created

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
