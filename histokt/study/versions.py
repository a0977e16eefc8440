"""One version per study: ``RUN_ROOT/versions.json`` pins the code its cells run.

The first submission records the identity of what will run the cells (``histokt.provenance.identity``:
histokt and its git commit, Python's minor version, torch, the image's SIF ID: the host's, or the image's
with ``--container``). A later sweep, or a cell started or requeued, under another identity is refused with
one line naming both; ``--allow-version-change`` adds the new one to the file (with when it was allowed), and
from then on both are accepted. Each result.json carries its own runtime, so the collector can say which
cells ran under which version (``by_version``).

    {"versions": [{"identity": {...}, "since": 1733000000.0, "allowed_change": false}, ...]}
"""

import time
from pathlib import Path

from histokt import atomic, provenance
from histokt.errors import UserError

VERSIONS = "versions.json"


def recorded(run_root) -> list[dict]:
    """The identities the study accepts, oldest first ([] before its first submission)."""
    doc = atomic.read_json(Path(run_root) / VERSIONS) or {}
    return [v["identity"] for v in doc.get("versions", [])]


def pin(run_root, ours: dict, allow_change: bool = False) -> None:
    """Record ``ours`` at the first submission; later, accept it where it is recorded, add it with
    ``allow_change``, else a UserError naming both versions (nothing written)."""
    path = Path(run_root) / VERSIONS
    doc = atomic.read_json(path) or {"versions": []}
    known = [v["identity"] for v in doc["versions"]]
    if any(provenance.same(k, ours) for k in known):
        return
    if known and not allow_change:
        raise UserError(
            f"{path}: this study runs {provenance.describe(known[-1])}; this sweep would run "
            f"{provenance.describe(ours)}: use that version (or its image), or --allow-version-change to mix them "
            f"(recorded; the collector's report lists the cells of each version)"
        )
    doc["versions"].append({"identity": ours, "since": time.time(), "allowed_change": bool(known)})
    atomic.write_json(path, doc)


def check_cell(run_root, where: str) -> None:
    """A cell about to run (first start or a requeue): a UserError where the study pins another version and
    this process's is not one it accepts; nothing where the study pins none (a run root of an older histokt,
    or a cell run by hand)."""
    known = recorded(run_root)
    if not known:
        return
    ours = provenance.identity(provenance.runtime(provenance.torch_version()))
    if not any(provenance.same(k, ours) for k in known):
        raise UserError(
            f"{where}: the study runs {provenance.describe(known[-1])}, this cell {provenance.describe(ours)}: "
            f"requeued into another version? run 'histokt sweep' again (--allow-version-change to mix them)"
        )


def by_version(runtimes: dict[str, dict]) -> dict[str, list[str]]:
    """{version line: [cell ids]} from each done cell's result.json runtime (cell id -> runtime): more than one
    key means a study whose results mix versions."""
    out: dict[str, list[str]] = {}
    for cell, rt in runtimes.items():
        out.setdefault(provenance.describe(provenance.identity(rt)), []).append(cell)
    return out
