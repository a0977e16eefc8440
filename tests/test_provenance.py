"""histokt.provenance: where a cell ran, recorded in result.json and state.json."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from histokt import __version__, provenance
from tests.conftest import ROOT


def test_outside_a_container_nothing_is_named(monkeypatch):
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    monkeypatch.delenv("SINGULARITY_CONTAINER", raising=False)
    got = provenance.runtime("2.14.1")
    assert got["container"] is None and got["torch"] == "2.14.1" and got["histokt"] == __version__
    assert got["python"].count(".") == 2


def test_the_image_and_its_sif_id(tmp_path, monkeypatch):
    """The ID apptainer writes into a SIF's global header (as `apptainer sif header` prints it)."""
    ident = uuid.uuid4()
    image = tmp_path / "h.sif"
    image.write_bytes(b"#!/usr/bin/env run-singularity\n".ljust(32, b"\0") + b"SIF_MAGIC\0" + b"01\0" + b"02\0"
                      + ident.bytes + b"\0" * 100)  # fmt: skip
    monkeypatch.setenv("APPTAINER_CONTAINER", str(image))
    assert provenance.runtime()["container"] == {"image": str(image), "sif_id": str(ident)}
    image.write_bytes(b"not a sif" * 20)  # a sandbox folder or another file: the path alone
    assert provenance.container() == {"image": str(image), "sif_id": None}
    assert provenance.sif_id(str(tmp_path / "gone.sif")) is None


def test_commit_of_this_checkout_and_none_outside_one(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout (a copy of the sources): nothing to compare with")
    assert provenance.commit().split("-")[0] == head.stdout.strip()[:12]
    copy = tmp_path / "pkg"  # an installed histokt: no .git above it
    shutil.copytree(ROOT / "histokt", copy / "histokt", ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from histokt import provenance; print(provenance.commit())"
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(copy)},
                       capture_output=True, text=True)  # fmt: skip
    assert r.stdout.strip() == "None", r.stderr


def test_identity_compares_what_a_study_pins():
    rt = {"python": "3.11.7", "torch": "2.14.1", "histokt": "0.1.0", "commit": "abc", "container": None}
    ident = provenance.identity(rt)
    assert ident == {"histokt": "0.1.0", "commit": "abc", "python": "3.11", "torch": "2.14.1", "image": "none"}
    assert provenance.same(ident, provenance.identity({**rt, "python": "3.11.2"}))  # the patch level: same
    for change in ({"histokt": "0.2.0"}, {"torch": "2.15.0"}, {"python": "3.12.1"}, {"commit": "def"}):
        assert not provenance.same(ident, provenance.identity({**rt, **change})), change
    in_image = provenance.identity({**rt, "container": {"image": "/i.sif", "sif_id": "u-1"}})
    assert in_image["image"] == "u-1" and not provenance.same(ident, in_image)
    unread = provenance.identity({**rt, "commit": None, "container": {"image": "/i.sif", "sif_id": None}})
    assert provenance.same(in_image, unread)  # unknown (an image file not bound, no checkout) agrees
    assert provenance.describe(ident) == "histokt 0.1.0 (commit abc), Python 3.11, torch 2.14.1, image none"
