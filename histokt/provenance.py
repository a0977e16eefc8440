"""Where a cell ran: the interpreter, the libraries and the container image, recorded with its result.

Inside Apptainer, ``APPTAINER_CONTAINER`` names the image (it is set in the container's environment). The
image's identity is its SIF ID: the UUID that ``apptainer build`` writes into every SIF's global header (bytes
48-64: after the 32-byte launch script, the 10-byte magic, the version and the architecture), which
``apptainer sif header IMAGE`` prints as ``ID``; reading it costs 64 bytes, where a digest of the ~3 GB image
would cost seconds in every cell.

A study is pinned to one version of all this (``histokt.study.versions``): ``identity`` is what is compared.
"""

import functools
import os
import platform
import subprocess
import uuid
from importlib import metadata
from pathlib import Path

from histokt import __version__

SIF_MAGIC = b"SIF_MAGIC\x00"


def container() -> dict | None:
    """{"image": path, "sif_id": uuid} of the Apptainer image this process runs in, or None outside one."""
    image = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    if not image:
        return None
    return {"image": image, "sif_id": sif_id(image)}


def sif_id(path: str) -> str | None:
    """The SIF ID of an image file, or None where it is not a readable SIF (a sandbox folder, say)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if len(head) < 64 or head[32:42] != SIF_MAGIC:
        return None
    return str(uuid.UUID(bytes=head[48:64]))


@functools.cache
def commit() -> str | None:
    """The git commit of the checkout histokt is imported from (``-dirty`` where its sources differ from it),
    or None for an installed histokt (a wheel, the image) or where git cannot tell. Asked once per process:
    the commit of the code it imported, not of a checkout moved on since (and two git calls, not two per
    cell of a pool worker)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "histokt", "setup.cfg"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip()[:12] + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def torch_version() -> str | None:
    """The installed torch's version, without importing it (seconds): a standardize cell never loads torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def runtime(torch_version: str | None = None) -> dict:
    """What ran a cell: Python, torch (when the caller has it loaded), histokt and its git commit where it runs
    from a checkout, and the container or None."""
    return {
        "python": platform.python_version(),
        "torch": torch_version,
        "histokt": __version__,
        "commit": commit(),
        "container": container(),
    }


def identity(rt: dict) -> dict:
    """The part of a runtime a study is pinned to: histokt (and commit), Python's minor version (what submitit's
    pickles need), torch, and the image's SIF ID ("none" outside a container; None: unknown, as in an image
    whose file is not bound, or an old result without the field)."""
    container = rt.get("container")
    image = "none" if container is None and "container" in rt else (container or {}).get("sif_id")
    python = rt.get("python")
    return {
        "histokt": rt.get("histokt"),
        "commit": rt.get("commit"),
        "python": ".".join(python.split(".")[:2]) if python else None,
        "torch": rt.get("torch"),
        "image": image,
    }


def same(a: dict, b: dict) -> bool:
    """Two identities that agree on every field both know (None: unknown, agrees with anything)."""
    return all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in {*a, *b})


def describe(ident: dict) -> str:
    """One line: 'histokt 0.1.0 (commit 1a2b3c4d5e6f), Python 3.11, torch 2.14.1, image none'."""
    commit = f" (commit {ident['commit']})" if ident.get("commit") else ""
    return (
        f"histokt {ident.get('histokt')}{commit}, Python {ident.get('python')}, torch {ident.get('torch')}, "
        f"image {ident.get('image') or 'unknown'}"
    )
