"""Sharded patch arrays: byte for byte zarr's sharding codec, a reader that names every kind of damage, and
padding on read that equals ingest's mirror padding."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

import histokt.atomic
from histokt.errors import UserError
from histokt.ingest.tiling import mirror_pad
from histokt.store import shards
from histokt.store.schema import StoreDamaged
from histokt.store.shards import (
    ShardDamaged,
    ShardedReader,
    ShardLayoutError,
    array_metadata,
    pad_on_read,
    shard_count,
    shard_path,
    verify_shard,
    write_array_metadata,
    write_shard,
)

H, W = 6, 5  # small content, not square: rows and columns cannot be swapped unnoticed


def patches_of(n, h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def zarr_array(path, n, h, w, shard_size):
    """The same array made by zarr itself (all chunks written, as our writer does)."""
    return zarr.create_array(
        store=str(path),
        shape=(n, h, w, 3),
        shards=(shard_size, h, w, 3),
        chunks=(1, h, w, 3),
        dtype="uint8",
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],
        fill_value=0,
        dimension_names=("n", "y", "x", "c"),
        zarr_format=3,
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True},
    )


def write_ours(array_dir, patches, shard_size):
    n, h, w = patches.shape[:3]
    write_array_metadata(array_dir, n, h, w, shard_size)
    return [
        write_shard(shard_path(array_dir, s), patches[s * shard_size : (s + 1) * shard_size], shard_size=shard_size)
        for s in range(shard_count(n, shard_size))
    ]


@pytest.mark.parametrize(("n", "h", "w", "shard_size"), [(10, 6, 5, 4), (7, 3, 3, 512), (0, 4, 4, 2), (5, 93, 93, 5)])
def test_metadata_is_what_zarr_writes(tmp_path, n, h, w, shard_size):
    zarr_array(tmp_path / "z", n, h, w, shard_size)
    assert array_metadata(n, h, w, shard_size) == json.loads((tmp_path / "z" / "zarr.json").read_text())


@pytest.mark.parametrize(("n", "shard_size"), [(10, 1), (10, 3), (10, 4), (10, 5), (10, 512)])
def test_shard_files_are_byte_for_byte_zarrs(tmp_path, n, shard_size):
    patches = patches_of(n)
    patches[2] = 0  # a patch equal to the fill value is still stored (zarr: with write_empty_chunks)
    by_zarr = zarr_array(tmp_path / "z", n, H, W, shard_size)
    by_zarr[...] = patches
    infos = write_ours(tmp_path / "ours", patches, shard_size)
    assert len(infos) == shard_count(n, shard_size) == -(-n // shard_size)
    for s, info in enumerate(infos):
        ours = shard_path(tmp_path / "ours", s).read_bytes()
        assert ours == shard_path(tmp_path / "z", s).read_bytes()
        assert info.count == min(shard_size, n - s * shard_size)
        assert (info.nbytes, info.sha256) == (len(ours), hashlib.sha256(ours).hexdigest())
    # the last shard of a partial array still indexes S slots, the missing ones absent (2^64-1, 2^64-1)
    last = shard_path(tmp_path / "ours", len(infos) - 1).read_bytes()
    index = np.frombuffer(last[-(16 * shard_size + 4) : -4], dtype="<u8").reshape(shard_size, 2)
    assert (index[infos[-1].count :] == 2**64 - 1).all()
    assert (index[: infos[-1].count, 1] == H * W * 3 + 4).all()


@pytest.mark.parametrize(("n", "shard_size"), [(10, 3), (9, 3), (10, 512), (23, 8)])
def test_zarr_reads_our_arrays_and_our_reader_equals_zarr(tmp_path, n, shard_size):
    patches = patches_of(n, seed=n)
    write_ours(tmp_path / "a", patches, shard_size)
    array = zarr.open_array(str(tmp_path / "a"), mode="r")
    assert array.shape == (n, H, W, 3)
    np.testing.assert_array_equal(array[...], patches)
    reader = ShardedReader(tmp_path / "a")
    assert len(reader) == n and reader.shape == (n, H, W, 3)
    for i in np.random.default_rng(1).permutation(n):
        got = reader.read(int(i))
        assert got.shape == (H, W, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, array[int(i)])
    with pytest.raises(IndexError):
        reader.read(n)
    reader.close()


def test_reader_reads_arrays_zarr_wrote(tmp_path):
    patches = patches_of(11)
    zarr_array(tmp_path / "z", 11, H, W, 4)[...] = patches
    reader = ShardedReader(tmp_path / "z")
    np.testing.assert_array_equal(np.stack([reader.read(i) for i in range(11)]), patches)
    assert all(reader.verify(s) == [] for s in range(3))


def test_few_descriptors_stay_open_and_the_reader_pickles_without_them(tmp_path):
    patches = patches_of(20)
    write_ours(tmp_path / "a", patches, 2)
    reader = ShardedReader(tmp_path / "a", max_open=3)
    for i in [0, 19, 5, 7, 11, 2, 13, 0]:
        np.testing.assert_array_equal(reader.read(i), patches[i])
        assert len(reader._fds) <= 3
    state = pickle.dumps(reader)
    clone = pickle.loads(state)
    assert clone._fds == {} and clone._index == {} and clone._shape is None
    np.testing.assert_array_equal(clone.read(17), patches[17])
    fds = list(reader._fds.values())
    reader.close()
    assert reader._fds == {}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    np.testing.assert_array_equal(reader.read(3), patches[3])  # reopens after close


def damaged(tmp_path, n=10, shard_size=4):
    patches = patches_of(n)
    write_ours(tmp_path / "a", patches, shard_size)
    return patches, ShardedReader(tmp_path / "a"), tmp_path / "a"


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def raises_one_line(reader, index, path, what):
    with pytest.raises(ShardDamaged) as caught:
        reader.read(index)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: patch {index}: ") and what in message, message
    assert isinstance(caught.value, StoreDamaged) and isinstance(caught.value, UserError)
    assert (caught.value.path, caught.value.index) == (str(path), index)
    return message


def test_a_flipped_patch_byte_names_the_patch_and_spares_its_neighbours(tmp_path):
    patches, reader, array = damaged(tmp_path)
    path, chunk = shard_path(array, 1), H * W * 3 + 4
    flip(path, 2 * chunk + 17)  # patch 6 = shard 1, slot 2
    message = raises_one_line(reader, 6, path, "patch checksum mismatch (stored 0x")
    assert "computed 0x" in message
    for i in (4, 5, 7, 0, 9):
        np.testing.assert_array_equal(reader.read(i), patches[i])
    flip(path, 2 * chunk + 17)  # flipped back: sound again
    np.testing.assert_array_equal(reader.read(6), patches[6])
    flip(path, 3 * chunk - 2)  # the stored checksum of patch 6 itself
    raises_one_line(reader, 6, path, "patch checksum mismatch")
    (problem,) = verify_shard(path, 4, shard_size=4, patch_nbytes=H * W * 3)
    assert problem.startswith(f"{path}: patch 6: patch checksum mismatch (stored 0x")


def test_a_flipped_index_byte_names_the_shard(tmp_path):
    _, reader, array = damaged(tmp_path)
    path = shard_path(array, 0)
    flip(path, path.stat().st_size - 4 - 16 * 3 + 1)  # slot 1's offset
    raises_one_line(reader, 2, path, "shard index checksum mismatch")
    raises_one_line(reader, 0, path, "shard index checksum mismatch")  # the whole index is untrusted
    np.testing.assert_array_equal(reader.read(5), patches_of(10)[5])  # other shards are fine
    flip(path, path.stat().st_size - 1)  # the index checksum itself
    raises_one_line(ShardedReader(array), 3, path, "shard index checksum mismatch")


def test_a_truncated_file_names_its_size(tmp_path):
    _, reader, array = damaged(tmp_path)
    path = shard_path(array, 1)
    whole = path.stat().st_size
    os.truncate(path, whole - 100)
    raises_one_line(reader, 5, path, f"the shard file is truncated ({whole - 100} of {whole} bytes; its index is lost)")
    os.truncate(path, 20)
    raises_one_line(ShardedReader(array), 7, path, f"the shard file is truncated (20 of {whole} bytes; no index)")
    os.truncate(path, 0)
    assert verify_shard(path, 4) == [f"{path}: is truncated (0 bytes, shorter than its 8196-byte index)"]


def test_a_missing_file_and_an_absent_patch(tmp_path):
    patches, reader, array = damaged(tmp_path)
    shard_path(array, 2).unlink()
    raises_one_line(reader, 9, shard_path(array, 2), "the shard file is missing")
    assert verify_shard(shard_path(array, 2), 2, shard_size=4) == [
        f"{shard_path(array, 2)}: is missing (2 patches expected)"
    ]
    write_shard(shard_path(array, 1), patches[4:6], shard_size=4)  # a shard that lost slots 2 and 3
    raises_one_line(ShardedReader(array), 7, shard_path(array, 1), "the patch is absent from the shard index")
    assert verify_shard(shard_path(array, 1), 4, shard_size=4) == [
        f"{shard_path(array, 1)}: patch 6: is absent from the shard index",
        f"{shard_path(array, 1)}: patch 7: is absent from the shard index",
    ]


def test_verify_lists_exactly_the_damage(tmp_path):
    _, reader, array = damaged(tmp_path, n=12, shard_size=4)
    nbytes = H * W * 3
    for s in range(3):
        assert verify_shard(shard_path(array, s), 4, shard_size=4, patch_nbytes=nbytes) == []
        assert reader.verify(s) == []
    path = shard_path(array, 1)
    flip(path, 1 * (nbytes + 4) + 3)
    flip(path, 3 * (nbytes + 4) + nbytes - 1)
    problems = reader.verify(1)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}: patch 5: patch checksum mismatch (stored 0x")
    assert problems[1].startswith(f"{path}: patch 7: patch checksum mismatch (stored 0x")
    assert reader.verify(0) == reader.verify(2) == []
    # a sound shard with more patches than expected, or of another patch size
    assert verify_shard(shard_path(array, 0), 3, shard_size=4) == [
        f"{shard_path(array, 0)}: patch 3: is present, but the shard should hold only 3 patches"
    ]
    assert verify_shard(shard_path(array, 0), 4, shard_size=4, patch_nbytes=nbytes + 3) == [
        f"{shard_path(array, 0)}: patch {j}: has {nbytes + 4} bytes in the index, expected {nbytes + 7}"
        for j in range(4)
    ]
    # the wrong shard size reads the wrong bytes as the index
    assert verify_shard(shard_path(array, 0), 4, shard_size=8) == [
        f"{shard_path(array, 0)}: index checksum mismatch ({shard_path(array, 0).stat().st_size} bytes; "
        "truncated or damaged)"
    ]


def test_layouts_the_reader_does_not_know_are_refused_by_name(tmp_path):
    # format 1: one file per patch, zarr's default chunk keys
    one = zarr.create_array(str(tmp_path / "one"), shape=(2, 8, 8, 3), chunks=(1, 8, 8, 3), dtype="uint8")
    one[0] = patches_of(1, 8, 8)[0]
    with pytest.raises(
        ShardLayoutError,
        match=r"one/zarr.json: not a sharded patch array \(chunk key encoding .*, expected default with .\..\)",
    ):
        ShardedReader(tmp_path / "one").read(0)
    with pytest.raises(ShardLayoutError, match=r"nothing/zarr.json: is missing"):
        len(ShardedReader(tmp_path / "nothing"))
    meta = array_metadata(4, 8, 8, 2)
    meta["codecs"][0]["configuration"]["codecs"] = [{"name": "bytes"}]
    histokt.atomic.write_json(tmp_path / "nocrc" / "zarr.json", meta)
    with pytest.raises(ShardLayoutError, match=r"inner codecs \['bytes'\], expected \[bytes, crc32c\]"):
        ShardedReader(tmp_path / "nocrc").read(0)


def test_write_shard_refuses_what_is_not_a_shard(tmp_path):
    with pytest.raises(ValueError, match="1 to 4 patches, not 5"):
        write_shard(tmp_path / "s", patches_of(5), shard_size=4)
    with pytest.raises(ValueError, match="1 to 4 patches, not 0"):
        write_shard(tmp_path / "s", patches_of(0), shard_size=4)
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path / "s", patches_of(2).astype(np.int16), shard_size=4)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 patches"):
        write_shard(tmp_path / "s", patches_of(2)[..., :2], shard_size=4)
    mixed = [patches_of(1, 8, 8)[0], patches_of(1, 8, 9)[0]]
    with pytest.raises(ValueError, match=r"\(8, 8, 3\) uint8 like the first"):
        write_shard(tmp_path / "s", iter(mixed), shard_size=4)
    assert list(tmp_path.iterdir()) == []


def test_write_shard_streams_an_iterable_to_the_same_bytes(tmp_path):
    patches = patches_of(3)
    a = write_shard(tmp_path / "a", patches, shard_size=4)
    b = write_shard(tmp_path / "b", (p for p in patches), shard_size=4)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert (a.count, a.nbytes, a.sha256) == (b.count, b.nbytes, b.sha256)


def test_write_shard_is_atomic(tmp_path, monkeypatch):
    folder = tmp_path / "c" / "0" / "0" / "0"
    path = folder / "0"
    old = write_shard(path, patches_of(3), shard_size=4)
    assert sorted(p.name for p in folder.iterdir()) == ["0"]  # no temporary file left

    calls = []

    def failing_crc(data):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk gone mid-write")
        return real_crc(data)

    real_crc = shards.google_crc32c.value
    monkeypatch.setattr(shards.google_crc32c, "value", failing_crc)
    with pytest.raises(OSError, match="mid-write"):
        write_shard(path, patches_of(4, seed=5), shard_size=4)
    with pytest.raises(OSError, match="mid-write"):
        calls.clear()
        write_shard(folder / "1", patches_of(4, seed=5), shard_size=4)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["0"]  # no new file, no temporary file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == old.sha256  # the old shard whole

    def failing_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(histokt.atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        write_shard(folder / "2", patches_of(4), shard_size=4)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["0"]


@pytest.mark.parametrize(("h", "w"), [(93, 93), (112, 112), (272, 260), (260, 272), (1, 1), (2, 7), (271, 136)])
def test_pad_on_read_is_mirror_pad(h, w):
    content = patches_of(1, h, w, seed=h * w)[0]
    padded = pad_on_read(content, 272)
    assert padded.shape == (272, 272, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded, mirror_pad(content, 272))


def test_pad_on_read_small_sizes_and_edges():
    for h in range(1, 14):
        for w in range(1, 14):
            content = np.arange(h * w * 3, dtype=np.int32).reshape(h, w, 3)
            np.testing.assert_array_equal(pad_on_read(content, 13), mirror_pad(content, 13))
            mask = content[..., 0]  # no channel axis
            np.testing.assert_array_equal(pad_on_read(mask, 13), mirror_pad(mask, 13))
    full = patches_of(1, 16, 16)[0]
    assert pad_on_read(full, 16) is full
    with pytest.raises(ValueError, match="17x16 is larger than the 16 px patch"):
        pad_on_read(patches_of(1, 17, 16)[0], 16)


def test_pad_on_read_of_read_only_content(tmp_path):
    content = patches_of(3, 93, 93)
    write_ours(tmp_path / "a", content, 2)
    patch = ShardedReader(tmp_path / "a").read(2)
    assert not patch.flags.writeable
    np.testing.assert_array_equal(pad_on_read(patch, 272), mirror_pad(content[2], 272))
