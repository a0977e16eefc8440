"""Planning: stable cell ids, the paper's study in thousands of cells, transfer inputs and normalization."""

import json
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
        "evbmf_search": "grid",
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
# lose their cells' directories: change them only on purpose, with a note in the release. The fields changed twice,
# on purpose: a training cell's inputs list its dataset's standardize markers first; a merge cell names its EVBMF
# search (a merge cell planned before runs the reference search it was planned with). Ids unchanged both times.
PAPER_IDS_SHA256 = "5925a5b3ab74738415b1ddc8348282c9b8d789b5ab5491ed74f7d2f495220f02"
PAPER_CELLS_SHA256 = "696cf4639fe6ca446b544010eb304e05ab4f22386248ee0931625a7b47245c45"


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


def job(name: str, tmp_path, monkeypatch):
    doc = tomllib.loads((ROOT / "jobs" / name).read_text())
    for d in doc["datasets"].values():
        (tmp_path / d["raw"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return load(ROOT / "jobs" / name)


@pytest.fixture
def parity(tmp_path, monkeypatch):
    return job("paper-parity.toml", tmp_path, monkeypatch)


def test_study_sizes_the_readme_states(parity, tmp_path, monkeypatch):
    from histokt.distill.merge import RULES

    assert sum(map(len, plan.expand(parity).values())) == 771
    cells = plan.expand(job("distill.toml", tmp_path, monkeypatch))
    assert sum(map(len, cells.values())) == 543 and (len(cells["merge"]), len(cells["distill"])) == (144, 288)
    assert {c.args["rule"] for c in cells["merge"]} == set(RULES)  # the study covers every rule


def test_the_parity_study_plans_the_paper_protocol(parity, tmp_path):
    from histokt.protocol import TARGET_LR

    cells = plan.expand(parity)
    # 9 x 8 pairs x 2 inits x 1 mode x 1 LR x 3 seeds: a fifth of the recommended study's 4,320 transfers
    assert len(cells["transfer"]) == 9 * 8 * 2 * 3
    trains = [c for s in ("pretrain", "transfer", "distill") for c in cells[s]]
    assert {c.args["protocol"] for c in trains} == {"paper"}  # Adas, fp32, augmented validation at train time
    std = {c.args["name"]: c.args for c in cells["standardize"]}
    assert {a["split_rule"] for a in std.values()} == {"patch"}
    assert "test=paper" in std["crc"]["option"] and "mask_resize=bilinear" in std["bcss"]["option"]
    assert std["adp"]["filter"] is False and all("filter" not in a for n, a in std.items() if n != "adp")
    transfers = cells["transfer"]
    # every trial of a transfer reads the one seed-0 source model; the LR is the target's best_lrs entry
    assert {c.inputs[-1].split("/")[-2].rsplit("-", 1)[1] for c in transfers} == {"s0"}
    assert {c.meta["seed"] for c in transfers} == {0, 1, 2}
    # one merged model per rule and set, from the seed-0 Stage-A models; its three trials all read it
    assert {c.id[-3:] for c in cells["merge"]} == {"-s0"} and len(cells["merge"]) == 8
    assert {c.args["seed"] for c in cells["distill"]} == {0, 1, 2} and len(cells["distill"]) == 8 * 2 * 5 * 3
    assert {c.inputs[-1].split("/")[-2][-3:] for c in cells["distill"]} == {"-s0"}
    assert all(c.args["lr"] == TARGET_LR[parity.datasets[c.args["dataset"]].card] for c in transfers)
    plan.write(tmp_path / "root", parity, cells)
    doc = json.loads((tmp_path / "root" / "plan.json").read_text())
    assert doc["protocol"] == "paper"
    assert [(d["what"], bool(d["fixed"])) for d in doc["deviations"]] == [
        ("split shuffles", True),
        ("merge rule", True),
    ]


def test_the_recommended_study_states_its_plan_deviations(paper, tmp_path):
    plan.write(tmp_path / "root", paper, plan.expand(paper))
    doc = json.loads((tmp_path / "root" / "plan.json").read_text())
    assert doc["protocol"] == "histokt"
    assert [d["what"] for d in doc["deviations"] if not d["fixed"]] == ["transfer LR", "trials"]


def test_a_spec_option_overrides_its_protocol_default(parity):
    parity.stages["transfer"].trial_sources = "matched"
    parity.stages["distill"].trial_sources = "matched"
    parity.datasets["os"].split_seed = 7
    parity.datasets["bach"].split_rule = "grouped"
    parity.datasets["adp"].filter = True
    cells = plan.expand(parity)
    assert {c.inputs[-1].split("/")[-2][-2:] for c in cells["transfer"]} == {"s0", "s1", "s2"}
    assert {c.inputs[-1].split("/")[-2][-2:] for c in cells["distill"]} == {"s0", "s1", "s2"}
    assert "trials" in [d.what for d in plan.deviations(parity)]
    parity.stages["transfer"].trial_sources = "first"  # the merged models' trials still differ from the paper's
    assert "trials" in [d.what for d in plan.deviations(parity)]
    parity.stages["distill"].trial_sources = "first"
    assert "trials" not in [d.what for d in plan.deviations(parity)]
    parity.stages["distill"].seeds = [0]  # one trial of each merged model: a mean without a std
    assert [d.what for d in plan.deviations(parity) if not d.fixed] == ["trials per result"]
    assert "split_rule" not in next(c for c in cells["standardize"] if c.args["name"] == "bach").args
    assert "filter" not in next(c for c in cells["standardize"] if c.args["name"] == "adp").args
    seeds = {c.args["name"]: c.args.get("split_seed") for c in cells["standardize"]}
    assert seeds["os"] == 7 and seeds["bach"] is None  # a seed of 0, the default, is not written


def test_the_light_copies_of_the_merge_rules_and_searches_match_the_merge_module():
    from histokt.distill import evbmf, merge
    from histokt.study import spec

    assert spec.RULES == merge.RULES and spec.EVBMF_SEARCHES == evbmf.SEARCHES


def test_a_distill_stage_passes_its_evbmf_search_to_every_merge(paper):
    assert {c.args["evbmf_search"] for c in plan.expand(paper)["merge"]} == {"grid"}  # unset: the default
    paper.stages["distill"].evbmf_search = "reference"
    assert {c.args["evbmf_search"] for c in plan.expand(paper)["merge"]} == {"reference"}
