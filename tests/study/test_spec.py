"""Experiment specs: jobs/*.toml parse; every mistake is one line naming the key path; nothing is written."""

from pathlib import Path

import pytest

from histokt.errors import UserError
from histokt.study.spec import load, parse

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[study]
name = "t"
store = "s.zarr"
run_root = "runs"

[datasets.a]
card = "folder"
raw = "{raw}"
mpp = 0.5

[stages.pretrain]
datasets = ["a"]
inits = ["random"]
seeds = [0, 1]
[stages.pretrain.recipe]
epochs = 2
[stages.pretrain.resources]
gpus = 1
time_min = 30
"""


@pytest.fixture
def text(tmp_path):
    (tmp_path / "raw").mkdir()
    return BASE.replace("{raw}", str(tmp_path / "raw"))


def test_valid_spec(text):
    import tomllib

    spec = parse(tomllib.loads(text), text)
    assert spec.datasets["a"].mpp == 0.5 and spec.stages["pretrain"].seeds == [0, 1]
    assert spec.stages["pretrain"].resources.gpus == 1 and spec.stages["pretrain"].recipe == {"epochs": 2}
    assert len(spec.digest) == 16


@pytest.mark.parametrize(
    "edit,message",
    [
        (('name = "t"', 'name = "t"\ncolour = "red"'), r"study.colour: unknown key"),
        (("seeds = [0, 1]", 'seeds = [0, "one"]'), r"stages.pretrain.seeds\[1\]: 'one' is not a int"),
        (('datasets = ["a"]', 'datasets = ["b"]'), r"stages.pretrain.datasets\[0\]: unknown dataset 'b'"),
        (('card = "folder"', 'card = "mnist"'), r"datasets.a.card: unknown card 'mnist'"),
        (("time_min = 30", "time_min = 0"), r"stages.pretrain.resources.time_min: 0 is impossible"),
        (("gpus = 1", 'gpus = 1\nmem_gb = "lots"'), r"stages.pretrain.resources.mem_gb: 'lots' is not a float"),
        (("epochs = 2", "epochs = 2\nseed = 3"), r"stages.pretrain.recipe.seed: set per cell by the sweep"),
        (("epochs = 2", "epochs = 2\nlearning = 1"), r"stages.pretrain.recipe.learning: unknown train option"),
        (("epochs = 2", 'epochs = "two"'), r"stages.pretrain.recipe.epochs: 'two' is not a int"),
        (('inits = ["random"]', 'inits = ["random", "clip"]'), r"stages.pretrain.inits\[1\]: 'clip'"),
        (("[stages.pretrain]", "[stages.finetune]\n[stages.pretrain]"), r"stages.finetune: unknown stage"),
    ],
)
def test_mistakes_name_the_key(text, edit, message):
    import tomllib

    bad = text.replace(*edit)
    with pytest.raises(UserError, match=message):
        parse(tomllib.loads(bad), bad)


def test_a_spec_loads_without_its_raw_data_and_the_sweep_says_what_is_missing(text, tmp_path):
    """A study is costed before anything is downloaded and goes on after the raw data is purged: only a
    standardize cell that still has to run needs its raw folder (a warning names it; the cell fails)."""
    import json

    from histokt.batch.sweep import SweepConfig, sweep
    from histokt.study import plan

    absent = tmp_path / "absent"
    path = tmp_path / "t.toml"
    doc = text.replace(str(tmp_path / "raw"), str(absent)).replace('"runs"', f'"{tmp_path / "runs"}"')
    path.write_text(doc + "\n[stages.standardize]\n")
    spec = load(path)
    assert spec.datasets["a"].raw == str(absent)
    out = sweep(SweepConfig(spec=path, dry_run=True, progress=False))
    assert out["warnings"] == [
        f"{path}: datasets.a.raw: {absent}: no such folder; its standardize cells will fail until the raw data is "
        f"staged there"
    ]
    # once the dataset is standardized, its raw data is no longer needed: no warning
    cells = plan.expand(spec)
    plan.write(tmp_path / "runs", spec, cells)
    done = plan.marker(tmp_path / "runs", cells["standardize"][0])
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"status": "done"}))
    assert sweep(SweepConfig(spec=path, dry_run=True, progress=False))["warnings"] == []


def test_transfer_lr_comes_from_lrs(text):
    import tomllib

    bad = text + '\n[stages.transfer]\nsources = ["a"]\n[stages.transfer.recipe]\nlr = 0.1\n'
    with pytest.raises(UserError, match=r"stages.transfer.recipe.lr: transfer LRs come from stages.transfer.lrs"):
        parse(tomllib.loads(bad), bad)


def test_transfer_needs_its_sources_pretrained(text):
    import tomllib

    bad = text + '\n[stages.transfer]\nsources = ["a"]\ninits = ["imagenet"]\n'
    with pytest.raises(UserError, match=r"stages.transfer.inits: 'imagenet' models are not trained"):
        parse(tomllib.loads(bad), bad)


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "x.toml").write_text("[study\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load(tmp_path / "x.toml")
    with pytest.raises(UserError, match="cannot read the spec"):
        load(tmp_path / "nope.toml")


def test_shipped_specs_parse(tmp_path, monkeypatch):
    import tomllib

    for name in ("demo.toml", "paper.toml"):
        doc = tomllib.loads((ROOT / "jobs" / name).read_text())
        for d in doc["datasets"].values():
            (tmp_path / d["raw"]).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    assert set(load(ROOT / "jobs" / "paper.toml").datasets) == {
        "adp",
        "mhist",
        "bach",
        "ajlymph",
        "pcam",
        "crc",
        "glas",
        "os",
        "bcss",
    }
    assert load(ROOT / "jobs" / "demo.toml").patch_size == 112


def test_max_per_class_is_read_and_checked(text):
    import tomllib

    capped = text.replace('card = "folder"', 'card = "folder"\nmax_per_class = 5')
    assert parse(tomllib.loads(capped), capped).datasets["a"].max_per_class == 5
    assert parse(tomllib.loads(text), text).datasets["a"].max_per_class is None
    bad = text.replace('card = "folder"', 'card = "folder"\nmax_per_class = 0')
    with pytest.raises(UserError, match=r"datasets.a.max_per_class: 0 must be at least 1"):
        parse(tomllib.loads(bad), bad)


def test_to_toml_reads_back_equal(text):
    import tomllib

    from histokt.study.spec import to_toml

    for doc in (
        tomllib.loads(text),
        tomllib.loads((ROOT / "jobs" / "paper.toml").read_text()),
        {"a": {"b": {"c": 1e-5, "d": {'quote"d key': 'x"y\\z é\n'}}}, "f": [[1, 2], ["a"]], "t": True, "e": {}},
    ):
        assert tomllib.loads(to_toml(doc)) == doc


TRANSFER = '\n[stages.transfer]\nsources = ["a"]\ntargets = ["a"]\ninclude_diagonal = true\nlrs = LRS\n'


@pytest.mark.parametrize("lr", ["0", "0.0", "-1e-3", "nan", "inf", "-inf", "+inf"])
def test_learning_rates_must_be_positive_and_finite(text, lr):
    import tomllib

    for bad in (
        text + TRANSFER.replace("LRS", f"[1e-3, {lr}]"),
        text.replace("epochs = 2", f"epochs = 2\nlr = {lr}"),  # Stage A's LR is its recipe's
    ):
        with pytest.raises(UserError) as exc:
            parse(tomllib.loads(bad), bad)
        message = str(exc.value)
        assert "\n" not in message
        key = "stages.transfer.lrs[1]" if "[stages.transfer]" in bad else "stages.pretrain.recipe.lr"
        assert f"{key}: " in message and "must be a positive, finite learning rate" in message, message


def test_good_learning_rates_pass(text):
    import tomllib

    good = text.replace("epochs = 2", "epochs = 2\nlr = 1") + TRANSFER.replace("LRS", "[1e-5, 0.5, 3]")
    spec = parse(tomllib.loads(good), good)
    assert spec.stages["transfer"].lrs == [1e-5, 0.5, 3.0] and spec.stages["pretrain"].recipe["lr"] == 1
    bad = text.replace("epochs = 2", 'epochs = 2\nlr = "fast"')
    with pytest.raises(UserError, match=r"stages.pretrain.recipe.lr: 'fast' is not a float"):
        parse(tomllib.loads(bad), bad)


@pytest.mark.parametrize(
    "edit,message",
    [
        (("mpp = 0.5", "mpp = 0.5\nshards = 0"), r"datasets.a.shards: 0 must be at least 1"),
        (("mpp = 0.5", "mpp = 0.5\nshards = -2"), r"datasets.a.shards: -2 must be at least 1"),
        (("mpp = 0.5", "mpp = 0.5\nmax_per_class = 0"), r"datasets.a.max_per_class: 0 must be at least 1"),
        (("mpp = 0.5", "mpp = 0"), r"datasets.a.mpp: 0.0 must be a positive, finite µm/px"),
        (("mpp = 0.5", "mpp = inf"), r"datasets.a.mpp: inf must be a positive, finite µm/px"),
        (("mpp = 0.5", "mpp = nan"), r"datasets.a.mpp: nan must be a positive, finite µm/px"),
        (('run_root = "runs"', 'run_root = "runs"\npatch_size = 4'), r"study.patch_size: 4 must be at least 8"),
        (('run_root = "runs"', 'run_root = "runs"\ntarget_mpp = 0'), r"study.target_mpp: 0.0 must be a positive"),
        (('run_root = "runs"', 'run_root = "runs"\ntarget_mpp = inf'), r"study.target_mpp: inf must be a positive"),
        (("gpus = 1", "gpus = -1"), r"stages.pretrain.resources.gpus: -1 is impossible; must be at least 0"),
        (("gpus = 1", "gpus = 1\ncpus = 0"), r"stages.pretrain.resources.cpus: 0 is impossible; must be at least 1"),
        (("gpus = 1", "gpus = 1\nnodes = 0"), r"stages.pretrain.resources.nodes: 0 is impossible"),
        (("gpus = 1", "gpus = 1\narray_parallelism = 0"), r"stages.pretrain.resources.array_parallelism: 0 is imp"),
        (("time_min = 30", "time_min = -5"), r"stages.pretrain.resources.time_min: -5 is impossible"),
        (("gpus = 1", "gpus = 1\nmem_gb = 0"), r"stages.pretrain.resources.mem_gb: 0.0 must be a positive, finite"),
        (("gpus = 1", "gpus = 1\nmem_gb = -4"), r"stages.pretrain.resources.mem_gb: -4.0 must be a positive"),
        (("gpus = 1", "gpus = 1\nmem_gb = nan"), r"stages.pretrain.resources.mem_gb: nan must be a positive"),
        (("gpus = 1", "gpus = 1\nmem_gb = inf"), r"stages.pretrain.resources.mem_gb: inf must be a positive"),
        (("gpus = 1", "gpus = true"), r"stages.pretrain.resources.gpus: True is not a int"),
        (
            ("epochs = 2", "epochs = 2\nweight_decay = nan"),
            r"stages.pretrain.recipe.weight_decay: nan must be a finite",
        ),
    ],
)
def test_numeric_checks_name_the_key(text, edit, message):
    import tomllib

    bad = text.replace(*edit)
    assert bad != text
    with pytest.raises(UserError, match=message) as exc:
        parse(tomllib.loads(bad), bad)
    assert "\n" not in str(exc.value)
