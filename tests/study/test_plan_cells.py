"""Planning on small specs: which LR, sources and targets a stage expands to, where a cell lives and what marks it
done, the run-root substitution, and what plan.json holds (the paper's whole plan is pinned in test_plan.py)."""

import json
import tomllib
from pathlib import Path

import pytest

from histokt.errors import UserError
from histokt.study import plan
from histokt.study.spec import parse

BASE = """
[study]
name = "unit"
store = "store.zarr"
run_root = "runs"

[datasets.colon]
card = "crc"
raw = "raw/colon"

[datasets.breast]
card = "bach"
raw = "raw/breast"

[datasets.mine]
card = "folder"
raw = "raw/mine"

[stages.pretrain]
datasets = ["colon", "breast"]
seeds = [0]
[stages.pretrain.recipe]
lr = 0.003
"""


@pytest.fixture
def make_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("colon", "breast", "mine"):
        (tmp_path / "raw" / name).mkdir(parents=True)

    def make(extra=""):
        text = BASE + extra
        return parse(tomllib.loads(text), text)

    return make


def test_per_target_lrs_follow_the_targets_card(make_spec):
    spec = make_spec('[stages.transfer]\nsources = ["colon"]\n')  # lrs omitted: "per-target"
    lrs = {c.meta["target"]: c.meta["lr"] for c in plan.expand(spec)["transfer"]}
    # the dataset's card decides (crc 5e-4, bach 5e-5); a card without a published LR gets 1e-4
    assert lrs == {"breast": 5e-5, "mine": 1e-4}
    assert {c.id for c in plan.expand(spec)["transfer"]} == {
        "B-random-colon-breast-deep-lr5e-5-s0",
        "B-random-colon-mine-deep-lr1e-4-s0",
    }


def test_per_target_lrs_of_distill(make_spec):
    spec = make_spec('[stages.distill]\nsource_sets = [["colon", "breast"]]\ntargets = ["colon", "mine"]\n')
    tunes = plan.expand(spec)["distill"]
    assert [(c.meta["target"], c.args["lr"]) for c in tunes] == [("colon", 5e-4), ("mine", 1e-4)]
    assert [c.id for c in tunes] == [
        "D-random-colon+breast-kg-select-colon-lr5e-4-s0",
        "D-random-colon+breast-kg-select-mine-lr1e-4-s0",
    ]


def test_transfer_defaults_every_pretrained_source_to_every_dataset_off_the_diagonal(make_spec):
    spec = make_spec("[stages.transfer]\nlrs = [0.001]\n")
    pairs = [(c.meta["source"], c.meta["target"]) for c in plan.expand(spec)["transfer"]]
    assert pairs == [("colon", "breast"), ("colon", "mine"), ("breast", "colon"), ("breast", "mine")]
    diagonal = make_spec("[stages.transfer]\nlrs = [0.001]\ninclude_diagonal = true\n")
    pairs = [(c.meta["source"], c.meta["target"]) for c in plan.expand(diagonal)["transfer"]]
    assert pairs == [(s, t) for s in ("colon", "breast") for t in ("colon", "breast", "mine")]


def test_transfer_keeps_the_sources_and_targets_it_names(make_spec):
    spec = make_spec('[stages.transfer]\nsources = ["breast"]\ntargets = ["colon"]\nlrs = [0.001]\n')
    (cell,) = plan.expand(spec)["transfer"]
    assert cell.id == "B-random-breast-colon-deep-lr1e-3-s0"
    assert cell.inputs == ["{run_root}/cells/pretrain/A-breast-random-s0/best.pt"]


def test_pretrain_meta_carries_the_recipe_lr_and_the_collector_has_no_args(make_spec):
    cells = plan.expand(make_spec())
    assert [c.meta["lr"] for c in cells["pretrain"]] == [0.003, 0.003]
    assert list(cells) == ["pretrain", "collect"]  # only the stages the spec names, and always the collector
    assert cells["collect"] == [plan.Cell("collect", "collect", "collect", {}, [], {})]


def test_lr_name():
    assert [plan.lr_name(x) for x in (1e-3, 5e-4, 5e-5, 0.003, 1e-10, 2.0)] == [
        "1e-3",
        "5e-4",
        "5e-5",
        "3e-3",
        "1e-10",
        "2e+00",
    ]


# -- where a cell lives and what marks it done -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,name",
    [("train", "result.json"), ("standardize", "done.json"), ("merge", "done.json"), ("collect", "done.json")],
)
def test_cell_dir_and_done_marker(tmp_path, kind, name):
    cell = plan.Cell("stage-x", "cell-y", kind)
    assert plan.cell_dir(tmp_path, cell) == tmp_path / "cells" / "stage-x" / "cell-y"
    assert plan.cell_dir(str(tmp_path), cell) == tmp_path / "cells" / "stage-x" / "cell-y"
    assert plan.marker(tmp_path, cell) == tmp_path / "cells" / "stage-x" / "cell-y" / name
    assert not plan.is_done(tmp_path, cell)
    other = "done.json" if name == "result.json" else "result.json"
    (tmp_path / "cells" / "stage-x" / "cell-y" / other).parent.mkdir(parents=True)
    (tmp_path / "cells" / "stage-x" / "cell-y" / other).write_text("{}")  # the other kind's marker: not done
    assert not plan.is_done(tmp_path, cell)
    (tmp_path / "cells" / "stage-x" / "cell-y" / name).mkdir()  # a directory is not the marker file
    assert not plan.is_done(tmp_path, cell)
    (tmp_path / "cells" / "stage-x" / "cell-y" / name).rmdir()
    (tmp_path / "cells" / "stage-x" / "cell-y" / name).write_text("{}")
    assert plan.is_done(tmp_path, cell)


# -- the run-root substitution -------------------------------------------------------------------------------------


def test_fill_run_root_makes_every_named_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "runs" / "s")
    assert plan.fill_run_root("{run_root}/cells/merge/M/merged.pt", "runs/s") == f"{root}/cells/merge/M/merged.pt"
    assert plan.fill_run_root("{run_root}/a:{run_root}/b", Path(root)) == f"{root}/a:{root}/b"
    assert plan.fill_run_root(["{run_root}/x", ["{run_root}/y", 3]], "runs/s") == [f"{root}/x", [f"{root}/y", 3]]
    assert plan.fill_run_root("no placeholder", "runs/s") == "no placeholder"
    for value in (3, 1e-3, None, True, {"k": "{run_root}"}):  # only strings and lists are filled
        assert plan.fill_run_root(value, "runs/s") == value


# -- plan.json -----------------------------------------------------------------------------------------------------


def test_plan_json_and_spec_toml(make_spec, tmp_path):
    spec = make_spec()
    cells = plan.expand(spec)
    root = tmp_path / "deep" / "new" / "root"  # its parents do not exist yet
    plan.write(root, spec, cells)
    assert (root / "spec.toml").read_text() == spec.text
    raw = (root / "plan.json").read_text()
    doc = json.loads(raw)
    assert raw == json.dumps(doc, separators=(",", ":"))  # compact: the paper's plan has thousands of cells
    assert doc["format"] == plan.PLAN_FORMAT == "histokt-plan/1"
    assert (doc["study"], doc["spec_digest"], doc["store"]) == ("unit", spec.digest, "store.zarr")
    assert list(doc["stages"]) == ["pretrain", "collect"]
    assert plan.read(root) == cells
    plan.write(root, spec, cells)  # the same spec again: accepted


def test_another_spec_is_refused_naming_both_digests(make_spec, tmp_path):
    spec, other = make_spec(), make_spec("\n# changed\n")
    plan.write(tmp_path / "root", spec, plan.expand(spec))
    with pytest.raises(UserError) as info:
        plan.write(tmp_path / "root", other, plan.expand(other))
    assert str(info.value) == (
        f"{tmp_path / 'root'}: was made from another spec (digest {spec.digest}, this one {other.digest}); "
        "use another run_root, or --force to re-plan it"
    )
    assert json.loads((tmp_path / "root" / "plan.json").read_text())["spec_digest"] == spec.digest  # untouched


def test_reading_a_run_root_without_a_plan(tmp_path):
    with pytest.raises(UserError) as info:
        plan.read(tmp_path)
    assert str(info.value) == f"{tmp_path}: no plan.json here; run 'histokt sweep SPEC' first"


def test_each_stage_keeps_only_the_weights_a_later_stage_reads(make_spec):
    """Stage A keeps best.pt (transfers and merges read it); transfers keep nothing but their result.json."""
    cells = plan.expand(make_spec('\n[stages.transfer]\nsources = ["colon"]\ntargets = ["breast"]\n'))
    assert {c.args["keep"] for c in cells["pretrain"]} == {"best"} == {plan.KEEP["pretrain"]}
    assert {c.args["keep"] for c in cells["transfer"]} == {"none"}
    # a recipe says otherwise where the user wants the final weights too
    kept = plan.expand(
        make_spec('\n[stages.transfer]\nsources = ["colon"]\n[stages.transfer.recipe]\nkeep = "final"\n')
    )
    assert {c.args["keep"] for c in kept["transfer"]} == {"final"}
    with pytest.raises(UserError, match=r"stages.transfer.recipe.keep: --keep 'all': choose best,final"):
        make_spec('\n[stages.transfer]\nsources = ["colon"]\n[stages.transfer.recipe]\nkeep = "all"\n')
