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


def test_missing_raw_path(text, tmp_path):
    import tomllib

    bad = text.replace(str(tmp_path / "raw"), str(tmp_path / "absent"))
    with pytest.raises(UserError, match=r"datasets.a.raw: .*absent: no such folder"):
        parse(tomllib.loads(bad), bad)


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
