import shutil

import numpy as np
import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures import raw_ajlymph
from tests.fixtures.images import save, tissue


@pytest.fixture
def raw(tmp_path):
    return raw_ajlymph.make(tmp_path)


def test_index_lists_images_by_class_folder(raw):
    (raw / "CLL" / "notes.txt").write_text("not an image")
    card = get_card("ajlymph")
    found = card.index(raw)
    sources = found.sources
    assert found.classes == ("CLL", "FL", "MCL")
    assert [(s.path, s.label) for s in sources] == [
        ("CLL/sj-03-2810_001.tif", 0), ("CLL/sj-03-2810_002.tif", 0),
        ("FL/sj-05-1881-R1_001.tif", 1), ("FL/sj-05-1881-R1_002.tif", 1),
        ("MCL/sj-05-3165_001.tif", 2), ("MCL/sj-05-3165_002.tif", 2),
    ]  # fmt: skip
    assert all(s.partition == "all" and s.group == s.path for s in sources)
    assert np.asarray(card.read(raw, sources[0])).shape == (40, 52, 3)


def test_card_constants():
    card = get_card("ajlymph")
    assert card.mpp == 0.25
    assert card.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}
    assert card.expected_counts == {"all": 374}


def test_class_folder_errors(raw, tmp_path):
    save(raw / "DLBCL" / "x.tif", tissue(8, 8))
    with pytest.raises(UserError, match=r"AJ-Lymph: classes unexpected \['DLBCL'\].*verify the download"):
        get_card("ajlymph").index(raw)
    shutil.rmtree(raw / "DLBCL")
    shutil.rmtree(raw / "FL")
    with pytest.raises(UserError, match=r"classes missing \['FL'\]"):
        get_card("ajlymph").index(raw)
    (raw / "FL").mkdir()
    with pytest.raises(UserError, match=r"FL: class folder holds no .tif images"):
        get_card("ajlymph").index(raw)
    with pytest.raises(UserError, match=r"missing: expected AJ-Lymph/"):
        get_card("ajlymph").index(tmp_path / "missing")
