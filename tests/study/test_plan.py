"""Planning: stable cell ids, the paper's study in thousands of cells, transfer inputs and normalization."""

import tomllib
from pathlib import Path

import pytest

from histokt.batch.sweep import chunks
from histokt.errors import UserError
from histokt.study import plan
from histokt.study.spec import load, parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def paper(tmp_path, monkeypatch):
    doc = tomllib.loads((ROOT / "jobs" / "paper.toml").read_text())
    for d in doc["datasets"].values():
        (tmp_path / d["raw"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return load(ROOT / "jobs" / "paper.toml")


def test_paper_study_cell_counts(paper):
    cells = plan.expand(paper)
    # shards 1+1+4+1+8+8+1+4+8; 9 sources x 2 inits x 3 seeds; 9 x 8 pairs x 2 inits x 2 modes x 5 LRs x 3 seeds
    # distill: 2 families x 2 source sets x 1 rule x 2 (low-rank or not) x 3 seeds merges, each tuned on 2 x 5 LRs
    assert {s: len(c) for s, c in cells.items()} == {
        "standardize": 36,
        "pretrain": 54,
        "transfer": 4320,
        "merge": 24,
        "distill": 240,
        "collect": 1,
    }
    ids = [c.id for cs in cells.values() for c in cs]
    assert len(set(ids)) == len(ids)
    assert [c.id for c in plan.expand(paper)["transfer"]] == [c.id for c in cells["transfer"]]  # stable


def test_transfer_cells_read_their_source_and_normalize_like_histokt(paper):
    cells = {c.id: c for c in plan.expand(paper)["transfer"]}
    r = cells["B-random-crc-bach-deep-lr5e-4-s1"]
    assert r.args["init"] == "{run_root}/cells/pretrain/A-crc-random-s1/best.pt" == r.inputs[-1]
    # and, first, the store of its target: every standardize cell of bach
    assert r.inputs[:-1] == [f"{{run_root}}/cells/standardize/std-bach-{i}of4/done.json" for i in range(4)]
    assert r.args["norm"] == "crc" and r.args["dataset"] == "bach" and r.args["lr"] == 5e-4
    i = cells["B-imagenet-crc-bach-fine-lr1e-3-s0"]
    assert i.args["norm"] == "imagenet" and i.args["mode"] == "fine"
    assert i.meta == {"family": "imagenet", "source": "crc", "target": "bach", "mode": "fine", "lr": 1e-3, "seed": 0}
    pre = {c.id: c for c in plan.expand(paper)["pretrain"]}
    assert pre["A-bach-imagenet-s2"].args["init"] == "imagenet" and pre["A-bach-random-s0"].args["norm"] == "dataset"


def test_distill_cells_merge_one_family_then_deep_tune(paper):
    cells = plan.expand(paper)
    merge = {c.id: c for c in cells["merge"]}["M-random-adp+bcss-kg-select-lowrank-s1"]
    assert merge.args == {
        "sources": ["{run_root}/cells/pretrain/A-adp-random-s1", "{run_root}/cells/pretrain/A-bcss-random-s1"],
        "rule": "kg-select",
        "lowrank": True,
    }
    tune = {c.id: c for c in cells["distill"]}["D-imagenet-adp+crc+os+bcss-kg-select-bach-lr2e-4-s0"]
    assert tune.args["init"] == "{run_root}/cells/merge/M-imagenet-adp+crc+os+bcss-kg-select-s0/merged.pt"
    assert tune.args["mode"] == "deep" and tune.args["norm"] == "imagenet" and tune.meta["rule"] == "kg-select"


def test_plan_round_trips_and_another_spec_is_refused(paper, tmp_path):
    cells = plan.expand(paper)
    plan.write(tmp_path / "root", paper, cells)
    back = plan.read(tmp_path / "root")
    assert [c.id for c in back["transfer"]] == [c.id for c in cells["transfer"]]
    other = parse(tomllib.loads(paper.text), paper.text + "\n# changed\n")
    with pytest.raises(UserError, match="made from another spec"):
        plan.write(tmp_path / "root", other, plan.expand(other))
    plan.write(tmp_path / "root", other, plan.expand(other), force=True)


def test_array_chunks_stay_below_max_array_size():
    got = chunks(list(range(2500)), 1000)
    assert [len(c) for c in got] == [1000, 1000, 500] and got[1][0] == 1000


# Computed from the plan of jobs/paper.toml before expand() was split into one function per stage: the ids, and
# every cell's fields (the run root's temporary path written as TMP). A change of either means re-planned studies
# lose their cells' directories: change them only on purpose, with a note in the release. The fields changed once,
# on purpose: a training cell's inputs list its dataset's standardize markers first (ids unchanged).
PAPER_IDS_SHA256 = "5925a5b3ab74738415b1ddc8348282c9b8d789b5ab5491ed74f7d2f495220f02"
PAPER_CELLS_SHA256 = "a98ab9ead032aaef646c62e583a8278cfed9d2df55d165db5007399febd41a78"


def test_paper_cell_ids_and_fields_are_unchanged(paper, tmp_path):
    import hashlib
    import json
    from dataclasses import asdict

    cells = plan.expand(paper)
    ids = sorted(c.id for cs in cells.values() for c in cs)
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest() == PAPER_IDS_SHA256
    doc = json.dumps({s: [asdict(c) for c in cs] for s, cs in cells.items()}, separators=(",", ":"))
    assert hashlib.sha256(doc.replace(str(tmp_path), "TMP").encode()).hexdigest() == PAPER_CELLS_SHA256


def test_pretrain_id_is_the_one_spelling(paper):
    cells = plan.expand(paper)
    pretrain = {c.id for c in cells["pretrain"]}
    assert plan.pretrain_id("crc", "imagenet", 2) == "A-crc-imagenet-s2" in pretrain
    for c in cells["transfer"]:  # every transfer and merge input is a pretrain cell's best.pt
        assert c.inputs[-1].split("/")[-2] in pretrain
    for c in cells["merge"]:
        assert {p.split("/")[-2] for p in c.inputs} <= pretrain
