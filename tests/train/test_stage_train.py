"""`histokt train --stage-to DIR`: the cell reads a node-local copy of its dataset (histokt.store.stage), trains
exactly as it would from the store, records the store it was given (never the copy, never stage_to), and
leaves no copy behind; $SLURM_TMPDIR is the default, 'off' turns it off; DDP ranks share one copy."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from histokt.errors import UserError
from histokt.store.stage import STAGE_DIR
from histokt.train import checkpoint
from histokt.train.config import TrainConfig, stage_dir
from histokt.train.launch import train
from tests.conftest import histokt_cmd
from tests.fixtures.stores import write_v2_dataset

FAST = dict(epochs=1, batch_size=8, workers=0, device="cpu", progress=False, eval_batch_size=16, augment=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two tiny datasets: the target "toy" and "src", whose statistics a transfer cell may normalize with."""
    root = tmp_path_factory.mktemp("stage") / "store.zarr"
    rng = np.random.default_rng(0)
    for name, fingerprint in (("toy", "1" * 16), ("src", "2" * 16)):
        splits = {
            split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 2)
            for split, n in (("train", 16), ("valid", 4), ("test", 4))
        }
        write_v2_dataset(root, name, splits, 32, fingerprint=fingerprint)
    return root


def test_stage_to_dir_reads_the_staged_copy_and_records_the_store(store, tmp_path, cli_env, monkeypatch):
    node = tmp_path / "node-local"
    out = tmp_path / "run"
    env = {k: v for k, v in cli_env.items() if k != "SLURM_TMPDIR"}
    args = ["train", "--store", store, "--dataset", "toy", "--out", out, "--stage-to", node]
    args += ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress"]
    r = subprocess.run(histokt_cmd(*args), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"histokt: staged toy to {node / STAGE_DIR}/toy-{'1' * 16}-" in r.stderr
    for recorded in (
        json.loads((out / "config.json").read_text()),
        json.loads((out / "result.json").read_text())["config"],
    ):
        assert recorded["store"] == str(store) and "stage_to" not in recorded
    assert list((node / STAGE_DIR).iterdir()) == []  # the last (only) user removed the copy


def test_slurm_tmpdir_is_the_default_and_the_result_is_the_unstaged_one(store, tmp_path, monkeypatch, capsys):
    node = tmp_path / "slurm-tmpdir"
    node.mkdir()
    monkeypatch.setenv("SLURM_TMPDIR", str(node))
    kw = dict(store=store, dataset="toy", norm="src", **FAST)  # norm: another dataset, read in place
    staged = train(TrainConfig(out=tmp_path / "staged", **kw))
    err = capsys.readouterr().err
    assert f"histokt: staged toy to {node / STAGE_DIR}/toy-" in err
    off = train(TrainConfig(out=tmp_path / "off", stage_to="off", **kw))
    assert "staged" not in capsys.readouterr().err
    a, b = (checkpoint.load(tmp_path / d / "final.pt")["model"] for d in ("staged", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert staged.result is not None and off.result is not None
    one, two = staged.result.to_json(), off.result.to_json()
    for r in (one, two):
        r.pop("seconds")
        r["config"].pop("out")
    assert one == two and one["config"]["store"] == str(store)
    assert list((node / STAGE_DIR).iterdir()) == []


def test_ddp_ranks_share_one_copy(store, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    node = tmp_path / "node"
    done = train(TrainConfig(store=store, dataset="toy", out=tmp_path / "ddp", nproc=2, stage_to=str(node), **FAST))
    assert done.result is not None and done.result.world_size == 2
    err = capfd.readouterr().err
    assert err.count("histokt: staged toy to") == 1, err  # one rank copied; the other waited and used it
    assert list((node / STAGE_DIR).iterdir()) == []


def test_stage_dir_resolution(tmp_path):
    job = str(tmp_path)  # the site's per-job folder
    assert stage_dir(None, {}) is None  # no site default: off
    assert stage_dir(None, {"SLURM_TMPDIR": job}) == tmp_path
    assert stage_dir(None, {"SLURM_TMPDIR": job + "/absent"}) is None  # not here (a container without it): off
    assert stage_dir("off", {"SLURM_TMPDIR": job}) is None
    assert stage_dir("/scratch/x", {"SLURM_TMPDIR": job}) == Path("/scratch/x")  # made where absent
    assert stage_dir("${SLURM_TMPDIR}/histokt-$USER", {"SLURM_TMPDIR": "/l", "USER": "me"}) == Path("/l/histokt-me")
    with pytest.raises(UserError, match=r"--stage-to \$LOCAL/x: \$LOCAL is not set here"):
        stage_dir("$LOCAL/x", {})


# -- the spec key: [study] stage_to reaches every training cell's arguments, never an id -------------------------


def spec_doc(study=None, recipe=None) -> dict:
    return {
        "study": {"name": "t", "store": "s.zarr", "run_root": "runs", **(study or {})},
        "datasets": {"a": {"card": "folder", "raw": "raw/a"}, "b": {"card": "folder", "raw": "raw/b"}},
        "stages": {
            "pretrain": {"datasets": ["a", "b"], "recipe": recipe or {}},
            "transfer": {"sources": ["a"], "targets": ["b"]},
        },
    }


@pytest.fixture
def raw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / "raw" / name).mkdir(parents=True)


def test_spec_stage_to_is_a_run_argument_of_every_training_cell_not_part_of_its_id(raw):
    from histokt.study import plan
    from histokt.study.spec import parse
    from histokt.train.config import config_dict

    plain = plan.expand(parse(spec_doc()))
    spec = parse(spec_doc({"stage_to": "$SLURM_TMPDIR/histokt"}))
    assert spec.stage_to == "$SLURM_TMPDIR/histokt" and parse(spec_doc()).stage_to is None
    cells = plan.expand(spec)
    assert {s: [c.id for c in cs] for s, cs in cells.items()} == {s: [c.id for c in cs] for s, cs in plain.items()}
    trains = [c for cs in cells.values() for c in cs if c.kind == "train"]
    assert len(trains) == 3
    for cell, before in zip(trains, [c for cs in plain.values() for c in cs if c.kind == "train"]):
        assert cell.args == {**before.args, "stage_to": "$SLURM_TMPDIR/histokt"}
        cfg = TrainConfig(**{**cell.args, "out": Path("o")})
        assert cfg.stage_to == "$SLURM_TMPDIR/histokt" and "stage_to" not in config_dict(cfg)
    assert all("stage_to" not in c.args for cs in cells.values() for c in cs if c.kind != "train")
    assert parse(spec_doc({"stage_to": "off"})).stage_to == "off"


@pytest.mark.parametrize(
    "study,recipe,message",
    [
        ({"stage_to": "scratch/x"}, None, "study.stage_to: 'scratch/x': expected an absolute folder on the nodes'"),
        ({"stage_to": 5}, None, "study.stage_to: 5 is not a str"),
        (None, {"stage_to": "/x"}, "stages.pretrain.recipe.stage_to: where nodes stage data is set once, as study."),
    ],
)
def test_spec_stage_to_bad_values_name_the_key(raw, study, recipe, message):
    from histokt.study.spec import parse

    with pytest.raises(UserError) as exc:
        parse(spec_doc(study, recipe), "", "jobs/t.toml")
    assert str(exc.value).startswith(f"jobs/t.toml: {message}") and "\n" not in str(exc.value)
