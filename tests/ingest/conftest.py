"""Fixtures shared by the standardize tests: a small folder dataset and its undisturbed store."""

import pytest

from histokt.ingest.standardize import standardize
from tests.fixtures.stores import folder_config, folder_dataset


@pytest.fixture
def raw(tmp_path):
    return folder_dataset(tmp_path, per_class=6, size=500)


@pytest.fixture
def reference(tmp_path, raw):
    """The store of an undisturbed one-process run: what every resumed or contended run must equal."""
    store = tmp_path / "ref.zarr"
    standardize(folder_config(raw, store))
    return store
