"""Where a cell ran: the interpreter, the libraries and the container image, recorded with its result.

Inside Apptainer, ``APPTAINER_CONTAINER`` names the image (it is set in the container's environment). The
image's identity is its SIF ID: the UUID that ``apptainer build`` writes into every SIF's global header (bytes
48-64: after the 32-byte launch script, the 10-byte magic, the version and the architecture), which
``apptainer sif header IMAGE`` prints as ``ID``; reading it costs 64 bytes, where a digest of the ~3 GB image
would cost seconds in every cell.
"""

import os
import platform
import uuid

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


def runtime(torch_version: str | None = None) -> dict:
    """What ran a cell: Python, torch (when the caller has it loaded), histokt, and the container or None."""
    return {
        "python": platform.python_version(),
        "torch": torch_version,
        "histokt": __version__,
        "container": container(),
    }
