"""The Dataset over a store split: exact patches, labels, batched reads, seeded augmentation, workers."""

import pickle

import numpy as np
import pytest
import torch
import zarr

from histokt.errors import UserError
from histokt.ingest.standardize import StandardizeConfig, standardize
from histokt.store.augment import Augment, Normalize, warp
from histokt.store.reader import PatchDataset, make_loader
from tests.fixtures.stores import folder_dataset


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    raw = folder_dataset(root, per_class=5, size=480)
    store = root / "s.zarr"
    standardize(StandardizeConfig(dataset="folder", raw=raw, store=store, mpp=1.0, progress=False))
    return store


def test_items_equal_the_stored_arrays(store):
    ds = PatchDataset(store, "folder", "train")
    g = zarr.open_group(str(store / "folder" / "train"), mode="r")
    assert len(ds) == g["images"].shape[0] > 0
    for i in (0, len(ds) // 2, len(ds) - 1):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 272, 272)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), g["images"][i])
        assert int(label) == g["labels"][i]


def test_batch_is_channels_last_and_matches_items(store):
    ds = PatchDataset(store, "folder", "train", normalize=Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    images, labels = ds.__getitems__([3, 0, 5])
    assert images.shape == (3, 3, 272, 272) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    raw = PatchDataset(store, "folder", "train")
    expected = (raw[5][0].float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(3, 1, 1)
    torch.testing.assert_close(images[2], expected)
    assert labels.tolist() == [int(raw[i][1]) for i in (3, 0, 5)]


def test_augmentation_depends_only_on_seed_epoch_index(store):
    a = PatchDataset(store, "folder", "train", augment=Augment(seed=3))
    b = PatchDataset(store, "folder", "train", augment=Augment(seed=3))
    x1 = a.__getitems__([4, 1])[0]
    x2 = b.__getitems__([1, 4])[0]
    assert torch.equal(x1[0], x2[1]) and torch.equal(x1[1], x2[0])
    b.augment.set_epoch(1)
    assert not torch.equal(b[4][0], a[4][0])
    assert not torch.equal(a[4][0], PatchDataset(store, "folder", "train")[4][0])


def test_warp_flips_are_exact():
    p = np.random.default_rng(0).integers(0, 255, (272, 272, 3), dtype=np.uint8)
    np.testing.assert_array_equal(warp(p, 0, 0, 0, False, False), p)
    np.testing.assert_array_equal(warp(p, 0, 0, 0, True, False), p[:, ::-1])
    np.testing.assert_array_equal(warp(p, 0, 0, 0, False, True), p[::-1])
    np.testing.assert_array_equal(warp(p, 90, 0, 0, False, False)[1:-1, 1:-1], np.rot90(p)[1:-1, 1:-1])
    shifted = warp(p, 0, 10, 0, False, False)
    np.testing.assert_array_equal(shifted[:, 10:], p[:, :-10])
    assert (shifted[:, :10] == 0).all()  # zero fill


def test_dataset_pickles_before_and_after_use(store):
    ds = PatchDataset(store, "folder", "valid", augment=Augment())
    clone = pickle.loads(pickle.dumps(ds))
    _ = ds[0]
    clone2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], ds[0][0]) and torch.equal(clone2[0][0], ds[0][0])


def test_loader_with_forkserver_workers_gives_the_same_batches(store):
    ds = PatchDataset(store, "folder", "train", augment=Augment(seed=1), normalize=Normalize((0.5,) * 3, (0.2,) * 3))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    ref = [ds.__getitems__(order[i : i + 4]) for i in range(0, len(order), 4)]
    loader = make_loader(ds, batch_size=4, sampler=order, workers=2)
    got = list(loader)
    assert len(got) == len(ref)
    for (xa, ya), (xb, yb) in zip(ref, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_worker_recycles_a_ring_of_batch_buffers(store, monkeypatch):
    from histokt.store import reader

    ds = PatchDataset(store, "folder", "train", recycle=True)
    monkeypatch.setattr(reader, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    ptrs = [ds.__getitems__([k % len(ds), 1])[0].data_ptr() for k in range(reader.RING + 2)]
    assert len(set(ptrs[: reader.RING])) == reader.RING  # a ring of RING distinct buffers
    assert ptrs[reader.RING :] == ptrs[:2]  # then the oldest comes round again
    fresh = PatchDataset(store, "folder", "train")
    a, b = fresh.__getitems__([0])[0], fresh.__getitems__([0])[0]  # both alive: a freed one's address comes back
    assert a.data_ptr() != b.data_ptr()
    assert pickle.loads(pickle.dumps(ds))._rings == {}  # a worker starts its own ring


def test_recycled_buffers_never_change_a_batch_the_loop_has_not_finished_with(store):
    """The training loop's use, over two epochs of persistent workers: each batch used while the next ones
    are made; the previous batch is still checked once the next has come (more than the loop needs)."""
    plain = PatchDataset(store, "folder", "train", augment=Augment(seed=1))
    ds = PatchDataset(store, "folder", "train", augment=Augment(seed=1), recycle=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist() * 2
    loader = make_loader(ds, batch_size=1, sampler=order, workers=1)  # one worker: its ring turns fastest
    for epoch in range(2):
        previous = None
        for i, batch in enumerate(loader):  # the worker runs ahead as far as the DataLoader lets it
            for k, (images, labels) in [(i, batch)] + ([previous] if previous else []):
                want, want_labels = plain.__getitems__(order[k : k + 1])
                assert torch.equal(images, want) and torch.equal(labels, want_labels), (epoch, k)
            previous = (i, batch)
        assert i == len(order) - 1


def test_missing_dataset_and_split(store, tmp_path):
    with pytest.raises(UserError, match="no dataset 'nope'.*folder"):
        PatchDataset(store, "nope", "train")
    with pytest.raises(UserError, match="not a histokt store"):
        PatchDataset(tmp_path, "folder", "train")
    with pytest.raises(UserError, match="split 'dev'"):
        PatchDataset(store, "folder", "dev")


def test_incompatible_store_format_is_refused(store, tmp_path):
    import json
    import shutil

    copy = tmp_path / "old.zarr"
    shutil.copytree(store, copy)
    meta = copy / "folder" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format"] = "histokt-patches/0"
    meta.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="standardize it again"):
        PatchDataset(copy, "folder", "train")


def test_device_warp_matches_the_loader_warp(store):
    from histokt.store.augment import warp_batch

    loader_side = PatchDataset(store, "folder", "train", augment=Augment(seed=2))
    device_side = PatchDataset(store, "folder", "train", augment=Augment(seed=2), augment_on_device=True)
    keys = [(3, 0), (3, 4), (5, 1)]
    want, labels = loader_side.__getitems__(keys)
    raw, labels2, params = device_side.__getitems__(keys)
    assert params.shape == (3, 5) and torch.equal(labels, labels2)
    got = warp_batch(raw.float(), params).round().to(torch.uint8)
    mismatch = (got != want).any(dim=1).float().mean()
    assert mismatch < 0.005  # nearest-neighbour rounding at a few boundary pixels only
    assert not torch.equal(raw, want)  # the device side really got unwarped pixels
