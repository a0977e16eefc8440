"""`histokt train`: the run-directory contract, exact resume after SIGKILL and SIGUSR2, fine vs deep, DDP."""

import json
import signal
import subprocess
import time

import pytest
import torch

from histokt import result as result_schema
from histokt.errors import EXIT_REQUEUE, UserError
from histokt.result import CellResult
from histokt.train import checkpoint
from histokt.train.config import OPERATIONAL, TrainConfig
from histokt.train.launch import train
from histokt.train.models import stand_in_imagenet
from histokt.train.outcome import Outcome
from tests.conftest import histokt_cmd
from tests.fixtures.trainstore import make_store

FAST = dict(epochs=3, batch_size=8, workers=0, device="cpu", progress=False, eval_batch_size=16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train"))


def cfg(store, out, **kw):
    return TrainConfig(store=store, dataset="toy", out=out, **{**FAST, **kw})


def cli_args(store, out, **kw):
    args = ["train", "--store", store, "--dataset", "toy", "--out", out]
    for k, v in {**FAST, **kw}.items():
        flag = "--" + k.replace("_", "-")
        if v is False:
            args.append("--no-" + k.replace("_", "-"))
        elif v is True:
            args.append(flag)
        else:
            args += [flag, v]
    return histokt_cmd(*args)


def finished(outcome: Outcome) -> CellResult:
    """The result of a run that was not interrupted."""
    assert not outcome.interrupted and outcome.result is not None, outcome
    return outcome.result


def weights(path):
    return checkpoint.load(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def same_result(a, b):
    """Equal results, but for wall time and the options that only change how a run executes."""
    a, b = json.loads(a.read_text()), json.loads(b.read_text())
    for r in (a, b):
        r.pop("seconds")
        for key in ("out",) + OPERATIONAL:
            r["config"].pop(key)
    return a == b


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory, cli_env_module):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert subprocess.run(cli_args(store, out, ckpt_every_steps=1), env=cli_env_module).returncode == 0
    return out


@pytest.fixture(scope="module")
def cli_env_module():
    import os

    from tests.conftest import ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_run_directory_contract(reference):
    for name in ("config.json", "metrics.jsonl", "best.pt", "final.pt", "result.json"):
        assert (reference / name).is_file(), name
    for name in ("last.pt", "previous.pt"):  # a done cell keeps no training state
        assert not (reference / name).exists(), name
    final = checkpoint.load(reference / "final.pt")
    assert final["epoch"] == 2 and set(final) == {"model", "epoch"}
    lines = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    text = (reference / "result.json").read_text()
    result = json.loads(text)
    # the schema of histokt.result is exactly what the trainer writes, byte for byte once parsed and re-dumped
    recorded = ("runtime", "settings", "protocol", "deviations")  # keys added after the first schema
    assert tuple(sorted(result)) == tuple(sorted([*result_schema.KEYS, *recorded]))
    assert result["settings"] == {"precision": "fp32", "compile": False, "warp": "loader"}  # the CPU defaults
    assert result["runtime"]["torch"] == torch.__version__ and result["runtime"]["container"] is None
    parsed = CellResult.from_json(result)
    assert parsed.to_json() == result
    assert json.dumps(parsed.to_json(), indent=1, sort_keys=True) + "\n" == text
    assert parsed.epochs == 3 and parsed.steps == 15 and len(parsed.classes) == 2 and parsed.world_size == 1
    assert result["world_size"] == 1 and result["seconds"] > 0
    assert {"top1", "balanced_acc", "per_class_acc", "loss"} <= set(result["test"])
    best = max(lines, key=lambda x: x["valid"]["top1"])
    assert result["valid"]["best_epoch"] == best["epoch"]
    assert result["valid"]["top1_best"] == best["valid"]["top1"]
    assert result["config"]["optimizer"] == "sgd" and result["config"]["lr"] == 0.03  # Stage-A recipe
    best_pt = checkpoint.load(reference / "best.pt")  # weights_only
    assert best_pt["epoch"] == best["epoch"] and "fc.weight" in best_pt["model"]
    assert best_pt["model"]["fc.weight"].shape == (2, 512)


def test_finished_run_is_a_noop(store, reference):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    result = finished(train(cfg(store, reference, ckpt_every_steps=1)))
    assert result.to_json() == json.loads((reference / "result.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before


def test_rerun_after_a_kill_between_result_and_cleanup_drops_the_training_state(store, tmp_path):
    import shutil

    out = tmp_path / "killed"
    done = finished(train(cfg(store, out, epochs=1)))
    files = sorted(p.name for p in out.iterdir())
    for name in ("last.pt", "previous.pt"):  # as a kill right after result.json leaves them
        shutil.copy(out / "final.pt", out / name)
    again = finished(train(cfg(store, out, epochs=1)))
    assert again.to_json() == json.loads((out / "result.json").read_text()) == done.to_json()
    assert sorted(p.name for p in out.iterdir()) == files and "last.pt" not in files


def test_other_config_into_same_dir_is_refused(store, reference):
    with pytest.raises(UserError, match=r"another config \(lr: 0.03 -> 0.1"):
        train(cfg(store, reference, ckpt_every_steps=1, lr=0.1))


def wait_for(predicate, proc, what):
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.02)


def test_sigkill_and_resume_is_bitwise_identical(store, reference, tmp_path, cli_env_module):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli_args(store, out, ckpt_every_steps=1), env=cli_env_module)
    # 38 train patches / batch 8 = 5 steps an epoch: kill mid-epoch 1, after at least 7 saved steps
    wait_for(lambda: (out / "previous.pt").exists() and checkpoint.load_latest(out)[0]["step"] >= 7, proc, "step 7")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    assert subprocess.run(cli_args(store, out, ckpt_every_steps=1), env=cli_env_module).returncode == 0
    assert_same_weights(weights(out / "best.pt"), weights(reference / "best.pt"))
    assert_same_weights(weights(out / "final.pt"), weights(reference / "final.pt"))
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert same_result(out / "result.json", reference / "result.json")


def test_sigusr2_checkpoints_exits_and_resumes(store, reference, tmp_path, cli_env_module):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_args(store, out, ckpt_every_steps=0), env=cli_env_module, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc, "the first epoch ended")
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert "run the same command again to resume" in err
    state = checkpoint.load(out / "last.pt")
    assert 5 <= state["step"] < 15 and not (out / "result.json").exists()
    assert subprocess.run(cli_args(store, out, ckpt_every_steps=0), env=cli_env_module).returncode == 0
    assert_same_weights(weights(out / "final.pt"), weights(reference / "final.pt"))
    assert same_result(out / "result.json", reference / "result.json")


def test_fine_freezes_encoder_and_deep_trains_it(store, reference, tmp_path):
    source = weights(reference / "best.pt")
    for mode in ("fine", "deep"):
        out = tmp_path / mode
        result = finished(train(cfg(store, out, init=str(reference / "best.pt"), mode=mode, epochs=1, lr=1e-3)))
        assert result.config["optimizer"] == "adamp"
        tuned = weights(out / "final.pt")
        encoder = [k for k in source if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
        same = [torch.equal(source[k], tuned[k]) for k in encoder]
        if mode == "fine":
            assert all(same)
        else:
            assert not any(same)
        assert not torch.equal(source["fc.weight"], tuned["fc.weight"])


def test_imagenet_init_from_staged_file(store, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="resnet18-f37072fd.pth"):
        train(cfg(store, tmp_path / "missing", init="imagenet", epochs=1))
    stand_in = stand_in_imagenet(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    result = finished(train(cfg(store, tmp_path / "in", init="imagenet", mode="fine", epochs=1, norm="imagenet")))
    staged = torch.load(stand_in, weights_only=True)
    tuned = weights(tmp_path / "in" / "final.pt")
    assert torch.equal(staged["layer4.1.conv2.weight"], tuned["layer4.1.conv2.weight"])
    assert result.config["init"] == "imagenet"


def test_nan_loss_stops_with_clear_error(store, tmp_path):
    with pytest.raises(UserError, match="loss is not finite at epoch 0 step"):
        train(cfg(store, tmp_path / "nan", lr=1e12, optimizer="sgd", ckpt_every_steps=1))
    assert not (tmp_path / "nan" / "result.json").exists()


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(dataset="nope"), "no dataset 'nope'"),
        (dict(optimizer="lion"), "unknown optimizer 'lion'"),
        (dict(batch_size=0), "--batch-size 0"),
        (dict(arch="resnet9000"), "resnet9000"),
    ],
)
def test_bad_input(store, tmp_path, kw, message):
    base = dict(store=store, dataset="toy", out=tmp_path / "bad", **FAST)
    with pytest.raises(UserError, match=message):
        train(TrainConfig(**{**base, **kw}))


def test_unwritable_run_dir(store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write there"):
        train(cfg(store, blocker / "run"))


def test_cli_errors_exit_2(store, tmp_path, cli_env_module):
    r = subprocess.run(
        cli_args(store, tmp_path / "x", optimizer="lion"), env=cli_env_module, capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown optimizer 'lion'" in r.stderr and "Traceback" not in r.stderr


def test_ddp_two_processes_match_single_process_with_syncbn(store, tmp_path):
    """One step of the whole split on one process and on two: the same update. Compared as the update's
    relative difference, because a fresh ResNet's BatchNorm over 2x2 maps amplifies the rounding of another
    sum order (measured on an AMD EPYC: 1e-7..1e-4 absolute after one step, varying between runs, 0.3 % of the
    update at worst; percent-size after a few steps). A DDP fault (gradients summed, not averaged; a rank
    on the wrong samples; BatchNorm not synchronized) changes the update by tens of percent. The ranks' share
    of later global batches is test_trainer's test_the_ranks_share_each_global_batch."""
    from histokt.train.models import build_model

    kw = dict(epochs=1, batch_size=38, sync_bn=True, augment=False)
    one = finished(train(cfg(store, tmp_path / "one", **kw)))
    two = finished(train(cfg(store, tmp_path / "two", nproc=2, **kw)))
    assert one.world_size == 1 and two.world_size == 2 and one.steps == two.steps == 1
    a, b = weights(tmp_path / "one" / "final.pt"), weights(tmp_path / "two" / "final.pt")
    torch.manual_seed(0)  # the trainer's seeded random init (TrainConfig.seed 0)
    init = build_model("resnet18", 2, "random").state_dict()
    for k in a:
        if a[k].dtype.is_floating_point and "running" not in k:
            update = (a[k] - init[k]).norm()
            assert update > 0, k
            assert (a[k] - b[k]).norm() < 0.05 * update, k
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0.05, atol=1e-3, msg=k)


def test_empty_split_is_refused(tmp_path):
    store = make_store(tmp_path, per_class=1)  # 2 images: one group each, so valid stays empty
    with pytest.raises(UserError, match="split is empty"):
        train(cfg(store, tmp_path / "run"))


def test_augmentation_on_the_device_path_trains(store, tmp_path):
    result = finished(train(cfg(store, tmp_path / "dev", epochs=1, augment_on="device")))
    assert result.config["augment_on"] == "device" and result.steps == 5


def test_readme_stage_b_command_line(reference, tmp_path, cli_env_module):
    """The README's Stage B line: a Stage-A model deep-tuned on a target, normalized with the source's statistics."""
    from histokt.ingest.standardize import StandardizeConfig, standardize

    store = make_store(tmp_path / "b", per_class=4)  # target "toy"
    standardize(
        StandardizeConfig(
            dataset="folder",
            raw=tmp_path / "b" / "raw",
            store=store,
            name="crc",
            mpp=1.0,
            patch_size=64,
            stride=64,
            split_seed=1,
            progress=False,
        )
    )  # the "source"
    out = tmp_path / "runs" / "B-crc-toy-deep-s0"
    args = [
        "train",
        "--store",
        store,
        "--dataset",
        "toy",
        "--out",
        out,
        "--init",
        reference / "best.pt",
        "--mode",
        "deep",
        "--norm",
        "crc",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    r = subprocess.run(histokt_cmd(*args), env=cli_env_module, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "result.json").read_text())["config"]
    assert (config["mode"], config["norm"], config["init"]) == ("deep", "crc", str(reference / "best.pt"))
    attrs = {name: json.loads((store / name / "zarr.json").read_text())["attributes"] for name in ("toy", "crc")}
    assert "norm" in attrs["crc"] and "norm" not in attrs["toy"]  # the source's statistics were the ones computed


def test_nproc_parent_forwards_sigusr2_to_its_ranks(store, tmp_path, cli_env_module):
    """The sbatch scripts signal histokt itself: with --nproc 2 the ranks must still checkpoint and exit 75."""
    ddp = dict(nproc=2, ckpt_every_steps=0, sync_bn=True)  # 3 epochs of 5 steps
    out = tmp_path / "ddp"
    proc = subprocess.Popen(cli_args(store, out, **ddp), env=cli_env_module, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc, "the first epoch ended")
    proc.send_signal(signal.SIGUSR2)  # the parent only, as slurm/*.sbatch forwards it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert 5 <= checkpoint.load(out / "last.pt")["step"] < 15 and not (out / "result.json").exists()
    assert subprocess.run(cli_args(store, out, **ddp), env=cli_env_module).returncode == 0
    uninterrupted = tmp_path / "whole"
    assert subprocess.run(cli_args(store, uninterrupted, **ddp), env=cli_env_module).returncode == 0
    assert_same_weights(weights(out / "final.pt"), weights(uninterrupted / "final.pt"))
