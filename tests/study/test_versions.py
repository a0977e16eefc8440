"""histokt.study.versions: a study pinned to the code its cells run."""

import json

import pytest

from histokt import provenance
from histokt.errors import UserError
from histokt.study import versions

V1 = {"histokt": "0.1.0", "commit": "abc", "python": "3.11", "torch": "2.14.1", "image": "none"}
V2 = {**V1, "histokt": "0.2.0", "commit": None}


def test_the_first_submission_pins_later_ones_must_match(tmp_path):
    versions.pin(tmp_path, V1)
    assert versions.recorded(tmp_path) == [V1]
    versions.pin(tmp_path, {**V1, "commit": None})  # unknown agrees: nothing added
    before = (tmp_path / versions.VERSIONS).read_bytes()
    with pytest.raises(UserError) as err:
        versions.pin(tmp_path, V2)
    message = str(err.value)
    assert "histokt 0.1.0 (commit abc)" in message and "histokt 0.2.0, Python" in message
    assert "--allow-version-change" in message and "\n" not in message
    assert (tmp_path / versions.VERSIONS).read_bytes() == before  # refused: nothing written


def test_an_allowed_change_is_recorded_and_both_are_accepted(tmp_path):
    versions.pin(tmp_path, V1)
    versions.pin(tmp_path, V2, allow_change=True)
    doc = json.loads((tmp_path / versions.VERSIONS).read_text())
    assert [v["identity"] for v in doc["versions"]] == [V1, V2]
    assert [v["allowed_change"] for v in doc["versions"]] == [False, True]
    versions.pin(tmp_path, V1)  # either one, from now on
    versions.pin(tmp_path, V2)
    assert len(json.loads((tmp_path / versions.VERSIONS).read_text())["versions"]) == 2


def test_a_cell_of_another_version_is_refused(tmp_path, monkeypatch):
    versions.check_cell(tmp_path, "cell")  # no versions.json (an older run root, a cell by hand): not checked
    here = provenance.identity(provenance.runtime(provenance.torch_version()))
    versions.pin(tmp_path, here)
    versions.check_cell(tmp_path, "cell")
    monkeypatch.setattr(provenance, "__version__", "9.9.9")  # what this process would record
    with pytest.raises(UserError, match=r"^RUN/cells/x: the study runs histokt .*, this cell histokt 9\.9\.9"):
        versions.check_cell(tmp_path, "RUN/cells/x")


def test_cells_grouped_by_version():
    rt = {"python": "3.11.7", "torch": "2.14.1", "histokt": "0.1.0", "commit": None, "container": None}
    groups = versions.by_version({"a": rt, "b": {**rt, "python": "3.11.2"}, "c": {**rt, "histokt": "0.2.0"}})
    assert sorted(map(sorted, groups.values())) == [["a", "b"], ["c"]]
