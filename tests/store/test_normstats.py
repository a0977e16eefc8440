"""Normalization statistics: HistoKT's formula, cached in the store once."""

import json

import numpy as np
import pytest

from histokt.store.normstats import IMAGENET, dataset_stats, norm_constants
from histokt.store.reader import PatchDataset
from tests.fixtures.trainstore import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("norm"), per_class=6)


def test_stats_follow_histokt_formula_and_are_cached(store):
    ds = PatchDataset(store, "toy", "train")
    imgs = np.stack([ds.reader.read(i) for i in range(len(ds))]).astype(np.float64) / 255
    per_image_mean = imgs.reshape(len(ds), -1, 3).mean(axis=1)
    mean = per_image_mean.mean(axis=0)
    per_image_sq = ((imgs.reshape(len(ds), -1, 3) - mean) ** 2).mean(axis=1)
    std = np.sqrt(per_image_sq.sum(axis=0) / (len(ds) - 1))
    got_mean, got_std = dataset_stats(store, "toy")
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_std, std, rtol=1e-6)
    attrs = json.loads((store / "toy" / "zarr.json").read_text())["attributes"]
    assert attrs["norm"]["mean"] == list(got_mean) and attrs["norm"]["patches"] == len(ds)
    assert PatchDataset(store, "toy", "train").attrs["norm"] == attrs["norm"]


def test_named_choices(store):
    assert norm_constants(store, "toy", "imagenet") == IMAGENET
    assert norm_constants(store, "toy", "none") == ((0.0,) * 3, (1.0,) * 3)
    assert norm_constants(store, "toy", "toy") == norm_constants(store, "toy", "dataset")
