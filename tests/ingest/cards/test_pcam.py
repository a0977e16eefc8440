import gzip
import os
import pickle
import random

import h5py
import numpy as np
import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from histokt.ingest.cards import pcam as pcam_module
from tests.fixtures import raw_pcam

X = "camelyonpatch_level_2_split_{}_x.h5"
Y = "camelyonpatch_level_2_split_{}_y.h5"


@pytest.fixture
def raw(tmp_path):
    return raw_pcam.make(tmp_path)


def card_for(tmp_path, **opts):
    return get_card("pcam", {"cache": str(tmp_path / "cache"), **opts})


def test_index_one_source_per_row(raw, tmp_path):
    card = card_for(tmp_path)
    found = card.index(raw)
    sources = found.sources
    assert found.classes == ("non_tumor", "tumor")
    assert [s.path for s in sources] == sorted(s.path for s in sources)
    assert {p: sum(s.partition == p for s in sources) for p in ("train", "valid", "test")} == raw_pcam.SIZES
    by_path = {s.path: s for s in sources}
    with h5py.File(raw / Y.format("train")) as f:
        y = f["y"][:, 0, 0, 0]
    for row in range(10):
        s = by_path[f"{X.format('train')}[{row}]"]
        assert (s.label, s.partition, s.group) == (int(y[row]), "train", s.path)
    assert by_path[f"{X.format('test')}[3]"].partition == "test"
    assert not (tmp_path / "cache").exists()  # plain .h5: nothing decompressed


def test_card_constants():
    card = get_card("pcam")
    assert card.mpp == 0.972 and "1.0" in card.mpp_source
    assert card.split_plan == {"train": {"train": 1.0}, "valid": {"valid": 1.0}, "test": {"test": 1.0}}
    assert card.expected_counts == {"train": 262144, "valid": 32768, "test": 32768}


def test_read_returns_the_row_and_card_pickles_with_open_handles(raw, tmp_path):
    card = card_for(tmp_path)
    sources = {s.path: s for s in card.index(raw).sources}
    src = sources[f"{X.format('valid')}[3]"]
    img = card.read(raw, src)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and img[0, 0, 0] == 3
    assert card._handles  # a handle is now cached in this process ...
    clone = pickle.loads(pickle.dumps(card))  # ... yet the card still pickles into workers
    assert clone._handles == {}
    assert clone.read(raw, sources[f"{X.format('train')}[7]"])[0, 0, 0] == 7
    card._pid = -1  # as in a forked child: the inherited handles are dropped and the file reopened
    assert card.read(raw, src)[0, 0, 0] == 3 and card._pid == os.getpid() and len(card._handles) == 1


def test_gz_only_is_decompressed_once_into_the_cache(tmp_path, monkeypatch):
    raw = raw_pcam.make(tmp_path, gz=True)
    card = card_for(tmp_path)
    sources = card.index(raw).sources
    assert sources[0].path == f"{X.format('test')}.gz[0]"
    cached = tmp_path / "cache" / X.format("train")
    assert cached.is_file() and (tmp_path / "cache" / f"{X.format('train')}.source.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
    src = next(s for s in sources if s.path == f"{X.format('train')}.gz[5]")
    assert card.read(raw, src)[0, 0, 0] == 5

    # Second time: the record matches, nothing is decompressed again.
    calls = []
    real_open = pcam_module.gzip.open
    monkeypatch.setattr(pcam_module.gzip, "open", lambda path, *a: calls.append(path.name) or real_open(path, *a))
    assert card_for(tmp_path).index(raw).sources == sources
    assert calls == []
    # A changed .gz (size/mtime) invalidates its record: that file alone is decompressed again.
    gz = raw / f"{X.format('train')}.gz"
    os.utime(gz, ns=(gz.stat().st_atime_ns, gz.stat().st_mtime_ns + 10**9))
    card_for(tmp_path).index(raw)
    assert calls == [gz.name]
    rec = pcam_module.read_json(tmp_path / "cache" / f"{X.format('train')}.source.json")
    assert rec["gz_mtime_ns"] == gz.stat().st_mtime_ns and rec["size"] == cached.stat().st_size


def test_h5_preferred_over_gz_when_both_exist(raw, tmp_path):
    raw_pcam.gzip_file(raw / X.format("train"), keep=True)
    sources = card_for(tmp_path).index(raw).sources
    assert f"{X.format('train')}[0]" in {s.path for s in sources}
    assert not (tmp_path / "cache").exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOKT_CACHE", str(tmp_path / "hc"))
    assert get_card("pcam").cache_dir() == tmp_path / "hc" / "pcam"
    monkeypatch.delenv("HISTOKT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert get_card("pcam").cache_dir() == tmp_path / "home" / ".cache" / "histokt" / "pcam"


def test_per_class_balanced_subset(tmp_path):
    raw = raw_pcam.make(tmp_path, sizes={"train": 20, "valid": 10, "test": 4})
    card = card_for(tmp_path, per_class=3)
    found = card.index(raw)
    sources = found.sources
    assert found.expected_counts == {"train": 6, "valid": 2, "test": 32768}
    train = sorted(int(s.path.split("[")[1][:-1]) for s in sources if s.partition == "train")
    y = raw_pcam.labels(20, 0)
    order = list(range(20))
    random.Random(42).shuffle(order)
    want = [r for r in order if y[r] == 0][:3] + [r for r in order if y[r] == 1][:3]
    assert train == sorted(want)
    valid = [s for s in sources if s.partition == "valid"]
    assert sorted(s.label for s in valid) == [0, 1]  # round(3 / 5) = 1 per class
    assert sum(s.partition == "test" for s in sources) == 4  # test kept whole
    with pytest.raises(UserError, match=r"per_class=-1"):
        get_card("pcam", {"per_class": -1})


def test_missing_file_is_an_error(raw, tmp_path):
    (raw / Y.format("valid")).unlink()
    with pytest.raises(UserError, match=rf"{Y.format('valid')}.gz: missing {Y.format('valid')} or .*verify"):
        card_for(tmp_path).index(raw)


@pytest.mark.parametrize(
    "kind, key, array, message",
    [
        ("x", "images", np.zeros((10, 96, 96, 3), np.uint8), r"missing HDF5 key 'x' \(keys: \['images'\]\)"),
        ("y", "labels", np.zeros((10, 1, 1, 1), np.uint8), r"missing HDF5 key 'y'"),
        ("x", "x", np.zeros((10, 96, 96, 3), np.float32), r"key 'x' is float32 \(10, 96, 96, 3\), expected uint8"),
        ("x", "x", np.zeros((10, 64, 64, 3), np.uint8), r"key 'x' is uint8 \(10, 64, 64, 3\)"),
        ("y", "y", np.zeros((10, 2), np.uint8), r"key 'y' is uint8 \(10, 2\), expected integers"),
        ("y", "y", np.zeros((10, 1, 1, 1), np.float64), r"key 'y' is float64"),
    ],
)
def test_bad_hdf5_content_is_an_error(raw, tmp_path, kind, key, array, message):
    name = (X if kind == "x" else Y).format("train")
    raw_pcam.write_h5(raw / name, key, array)
    with pytest.raises(UserError, match=rf"{name}: {message}"):
        card_for(tmp_path).index(raw)


def test_length_mismatch_names_both_files(raw, tmp_path):
    raw_pcam.write_h5(raw / Y.format("valid"), "y", np.zeros((3, 1, 1, 1), np.uint8))
    with pytest.raises(UserError, match=rf"{X.format('valid')} has 4 rows but {Y.format('valid')} has 3 labels"):
        card_for(tmp_path).index(raw)


def test_label_outside_0_1_is_an_error(raw, tmp_path):
    y = np.zeros((10, 1, 1, 1), np.uint8)
    y[6] = 2
    raw_pcam.write_h5(raw / Y.format("train"), "y", y)
    with pytest.raises(UserError, match=rf"{Y.format('train')}: label 2 at row 6 \(1 rows outside"):
        card_for(tmp_path).index(raw)


def test_unreadable_files_are_errors(raw, tmp_path):
    raw_pcam.gzip_file(raw / X.format("test"))
    (raw / f"{X.format('test')}.gz").rename(raw / X.format("test"))  # still gzip, named .h5
    with pytest.raises(UserError, match=rf"{X.format('test')}: is gzip-compressed"):
        card_for(tmp_path).index(raw)
    (raw / X.format("test")).write_bytes(b"plain junk")
    with pytest.raises(UserError, match=rf"{X.format('test')}: not a readable HDF5 file"):
        card_for(tmp_path).index(raw)
    (raw / X.format("test")).unlink()
    data = gzip.compress(b"x" * 100_000)
    (raw / f"{X.format('test')}.gz").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(UserError, match=rf"{X.format('test')}.gz: corrupt or truncated gzip file"):
        card_for(tmp_path).index(raw)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
