"""Pytest helper for tests that need the real image (``bash containers/build.sh``, or ``make image``, builds
it and links it as ``histokt.sif`` in the repository root; ``HISTOKT_IMAGE`` names another) and Apptainer.

Without them the fixture skips with the reason; with ``HISTOKT_REQUIRE_APPTAINER=1`` it fails instead (CI
installs Apptainer and builds the image first, so a broken build cannot pass as "skipped").
"""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "HISTOKT_REQUIRE_APPTAINER"


@pytest.fixture(scope="session")
def image() -> Path:
    """The built image, or a skip (a failure under HISTOKT_REQUIRE_APPTAINER=1) saying what is missing."""
    path = Path(os.environ.get("HISTOKT_IMAGE") or ROOT / "histokt.sif")
    why = None
    if shutil.which("apptainer") is None:
        why = "apptainer is not on PATH (bash containers/install-apptainer.sh, as root)"
    elif not path.is_file():
        why = f"no image at {path} (bash containers/build.sh builds it)"
    if why is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}; {REQUIRE_ENV}=1 asks for the real image")
        pytest.skip(why)
    return path.resolve()
