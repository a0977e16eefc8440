"""Store primitives: chunk files written directly are exactly zarr's; the reader names damaged ones."""

import numpy as np
import pytest
import zarr

from histokt.errors import UserError
from histokt.store.schema import PatchReader, StoreDamaged, chunk_file, patch_array, write_chunk


def test_write_chunk_matches_zarr_bytes(tmp_path):
    patches = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    by_zarr = patch_array(tmp_path / "a", 3, 32)
    by_zarr[...] = patches
    patch_array(tmp_path / "b", 3, 32)
    for i, p in enumerate(patches):
        write_chunk(tmp_path / "b", i, p)
        assert chunk_file(tmp_path / "b", i).read_bytes() == chunk_file(tmp_path / "a", i).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "b"), mode="r")[...], patches)


def small_store(root, n=3, size=8):
    """STORE/d with a train split of ``n`` patches written as standardize writes them (card 'folder')."""
    store = root / "s.zarr"
    group = zarr.open_group(str(store / "d"), mode="w", zarr_format=3)
    group.attrs.update({"card": {"card": "folder", "options": {}}})
    group.create_group("train")
    patch_array(store / "d" / "train" / "images", n, size)
    patches = np.random.default_rng(1).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    for i, p in enumerate(patches):
        write_chunk(store / "d" / "train" / "images", i, p)
    return store, patches


def test_reader_reads_what_was_written(tmp_path):
    store, patches = small_store(tmp_path)
    reader = PatchReader(store, "d", "train")
    assert len(reader) == 3
    np.testing.assert_array_equal(reader.read(2), patches[2])


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_patch_file_is_an_error_naming_it_and_the_repair(tmp_path, damage):
    store, patches = small_store(tmp_path)
    path = chunk_file(store / "d" / "train" / "images", 1)
    if damage == "missing":  # every kept patch is written: a missing file is damage, never a black patch
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    reader = PatchReader(store, "d", "train")
    with pytest.raises(StoreDamaged) as caught:
        reader.read(1)
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert message.startswith(f"dataset 'd', split train, patch 1: {path} is {damage}")
    assert (
        "histokt standardize --dataset folder --raw RAW" in message
        and f"--store {store} --name d --overwrite" in message
    )
    if damage == "truncated":
        assert "(100 of 192 bytes)" in message
    np.testing.assert_array_equal(reader.read(0), patches[0])  # the others still read
