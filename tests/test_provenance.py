"""histokt.provenance: where a cell ran, recorded in result.json and state.json."""

import uuid

from histokt import __version__, provenance


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
