"""A split held in device memory (the CPU here) makes the loader path's batches: pixels, labels and draws."""

import numpy as np
import pytest
import torch
from PIL import Image

from histokt.batch.demo import synthetic_tile
from histokt.ingest.standardize import StandardizeConfig, standardize
from histokt.store.augment import Augment
from histokt.store.reader import PatchDataset, make_loader
from histokt.store.resident import ResidentLoader, ResidentSplit, reflect_index, split_nbytes
from histokt.store.sampler import GlobalBatchSampler
from histokt.store.shards import pad_on_read

CPU = torch.device("cpu")


def small_store(root, size: int, patch: int, per_class: int = 12):
    """A folder dataset of ``size`` px tiles standardized to ``patch`` px patches (PCam-like where smaller)."""
    rng = np.random.default_rng(0)
    raw = root / "raw"
    for name, (density, radius) in {"a": (3, 2), "b": (40, 4)}.items():
        (raw / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_tile(size, density, radius, rng)).save(raw / name / f"{name}{i}.png")
    store = root / "s.zarr"
    standardize(
        StandardizeConfig(
            dataset="folder", raw=raw, store=store, name="d", mpp=1.0, patch_size=patch, stride=patch, progress=False
        )
    )
    return store


@pytest.fixture(scope="module", params=["padded", "full"])
def store(request, tmp_path_factory):
    """30 px content mirror-padded to 64 px (more than one reflection), and content as large as the patch."""
    size = 30 if request.param == "padded" else 64
    return small_store(tmp_path_factory.mktemp(request.param), size, 64)


@pytest.mark.parametrize("n", [1, 2, 3, 30, 64])
def test_reflect_index_is_the_stores_mirror_pad(n):
    content = np.arange(n * 5 * 3, dtype=np.uint8).reshape(n, 5, 3)
    np.testing.assert_array_equal(content[reflect_index(n, 64)], pad_on_read(content, 64)[:, :5])


def test_batches_equal_the_loader_paths_for_the_same_keys(store):
    split = ResidentSplit(store, "d", "train", CPU, augment=Augment(seed=4))
    loader_side = PatchDataset(store, "d", "train", augment=Augment(seed=4), augment_on_device=True)
    keys = [(2, 7), (2, 0), (3, 7), (2, len(split) - 1)]
    images, labels, draws = split.batch(keys)
    want_images, want_labels, want_draws = loader_side.__getitems__(keys)
    assert images.shape == want_images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)  # the loader's NHWC layout too
    assert torch.equal(images, want_images)
    assert torch.equal(labels, want_labels) and torch.equal(draws, want_draws)
    assert not torch.equal(draws[0], draws[2])  # epochs draw differently


def test_a_resident_loader_yields_the_data_loaders_batches_and_resumes_mid_epoch(store):
    split = ResidentSplit(store, "d", "train", CPU, augment=Augment(seed=1))
    dataset = PatchDataset(store, "d", "train", augment=Augment(seed=1), augment_on_device=True)
    for start in (0, 2):
        a, b = (GlobalBatchSampler(len(split), 8, seed=5) for _ in range(2))
        a.set_epoch(1, start)
        b.set_epoch(1, start)
        got, want = list(ResidentLoader(split, a)), list(make_loader(dataset, batch_sampler=b))
        assert len(got) == len(want) == len(a) - start > 0
        for g, w in zip(got, want, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(g, w, strict=True))


def test_rows_hold_a_shard_only_and_its_batches_are_the_stored_patches(store):
    whole = PatchDataset(store, "d", "train")
    part = ResidentSplit(store, "d", "train", CPU, rows=range(3, 9))
    assert len(part) == 6 and part.content.shape[0] == 6
    images, labels = part.rows_batch(4, 8)
    want_images, want_labels = whole.__getitems__([4, 5, 6, 7])
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert torch.equal(part.batch([5])[0], whole.__getitems__([5])[0])


def test_split_nbytes_is_what_the_split_takes(store):
    for split in ("train", "valid", "test"):
        assert split_nbytes(store, "d", split) == ResidentSplit(store, "d", split, CPU).nbytes > 0


def test_the_padded_store_holds_only_content(tmp_path_factory, store):
    split = ResidentSplit(store, "d", "valid", CPU)
    assert split.content.shape[1:3] in ((30, 30), (64, 64))
    assert split.batch([0])[0].shape[-2:] == (64, 64)


def test_a_multi_label_split_holds_float_label_rows(tmp_path):
    from tests.fixtures import raw_adp

    raw = raw_adp.make(tmp_path, nested=True)
    store = tmp_path / "adp.zarr"
    standardize(StandardizeConfig(dataset="adp", raw=raw, store=store, progress=False))
    split = ResidentSplit(store, "adp", "train", CPU)
    want = PatchDataset(store, "adp", "train").__getitems__([0, 3])
    got = split.batch([0, 3])
    assert got[1].dtype == torch.float32 and got[1].shape[1] > 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert split_nbytes(store, "adp", "train") == split.nbytes
