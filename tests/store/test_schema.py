"""The store's reader: patches read back padded exactly as ingest pads, damage named with its repair,
format 1 refused with its upgrade."""

import pickle

import numpy as np
import pytest

from histokt.errors import UserError
from histokt.store.schema import PatchReader, StoreDamaged, check_format, open_attrs
from histokt.store.shards import shard_path
from tests.fixtures.stores import write_v2_dataset


def content(n, h, w, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def small_store(root, n=6, h=8, w=8, patch_size=8):
    store = root / "s.zarr"
    patches = content(n, h, w)
    write_v2_dataset(store, "d", {"train": (patches, np.zeros(n))}, patch_size, shard_size=4)
    return store, patches


def test_reader_reads_what_was_written(tmp_path):
    store, patches = small_store(tmp_path)
    reader = PatchReader(store, "d", "train")
    assert len(reader) == 6 and reader.shape == (6, 8, 8, 3) and reader.content_shape == (8, 8)
    for i in (0, 3, 4, 5):  # both shards
        np.testing.assert_array_equal(reader.read(i), patches[i])
    again = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker gets: no open files
    np.testing.assert_array_equal(again.read(5), patches[5])


@pytest.mark.parametrize("h,w", [(93, 93), (112, 112), (50, 60), (272, 93)])
def test_content_is_padded_on_read_as_ingest_pads_it(tmp_path, h, w):
    """PCam (93 px of content at 1 µm/px), CRC (112 px) and odd sizes: every patch read equals the padded
    patch format 1 stored, computed here independently with numpy's mirror padding."""
    store, patches = small_store(tmp_path, n=5, h=h, w=w, patch_size=272)
    reader = PatchReader(store, "d", "train")
    assert reader.content_shape == (h, w) and reader.shape == (5, 272, 272, 3)
    for i in range(5):
        padded = np.pad(patches[i], [(0, 272 - h), (0, 272 - w), (0, 0)], mode="reflect")
        np.testing.assert_array_equal(reader.read(i), padded)
        np.testing.assert_array_equal(reader.read_content(i), patches[i])


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_damage_is_an_error_naming_the_shard_and_the_repair(tmp_path, damage):
    store, patches = small_store(tmp_path)
    path = shard_path(store / "d" / "train" / "images", 0)
    data = path.read_bytes()
    if damage == "missing":  # every kept patch is written: a missing file is damage, never a black patch
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:100])
    else:
        path.write_bytes(data[:200] + bytes([data[200] ^ 4]) + data[201:])  # a byte of patch 1
    reader = PatchReader(store, "d", "train")
    with pytest.raises(StoreDamaged) as caught:
        reader.read(1)
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    what = {
        "missing": "the shard file is missing",
        "truncated": "the shard file is truncated (100 of",
        "flipped": "patch checksum mismatch",
    }[damage]
    assert message.startswith(f"dataset 'd', split train, patch 1: {path}: {what}")
    assert f"histokt verify {store} --dataset d" in message
    assert f"histokt standardize --dataset folder --raw RAW --store {store} --name d --repair" in message
    np.testing.assert_array_equal(reader.read(4), patches[4])  # the other shard still reads
    if damage == "flipped":
        np.testing.assert_array_equal(reader.read(0), patches[0])  # and the other patches of the shard


def test_format_1_is_refused_with_the_upgrade_command(tmp_path):
    store, _ = small_store(tmp_path)
    check_format(store, "d", {"format": "histokt-patches/2"})
    with pytest.raises(UserError) as caught:
        check_format(store, "d", {"format": "histokt-patches/1"})
    assert str(caught.value) == (
        f"{store}/d: store format histokt-patches/1 (one file per patch), this histokt reads histokt-patches/2; "
        f"convert the store with 'histokt store upgrade {store} NEW_STORE', or standardize the dataset again"
    )
    with pytest.raises(UserError, match=r"store format 'histokt-patches/0', .*standardize it again"):
        check_format(store, "d", {"format": "histokt-patches/0"})
    assert open_attrs(store, "d")["content_size"] == [8, 8]
