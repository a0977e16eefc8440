"""`histokt distill`: kg-select / average / kg-weighted merges, --lowrank, the merged file as --init, errors."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from histokt.cli import main
from histokt.distill.evbmf import layer_metrics, unfold
from histokt.distill.merge import DistillConfig, _apply_lowrank, conv_groups, distill, rule_weights
from histokt.errors import UserError
from histokt.train import checkpoint
from histokt.train.config import TrainConfig
from histokt.train.launch import train
from histokt.train.models import build_model
from tests.fixtures.trainstore import make_store

# Layers where source A holds a clearly higher-rank conv than B, and the other way round.
A_HIGH = ("layer1.0.conv2", "layer2.0.downsample.0", "layer3.1.conv1", "layer4.0.conv2")
B_HIGH = ("layer1.1.conv1", "layer2.1.conv2", "layer3.0.downsample.0", "layer3.0.conv1", "layer4.1.conv2")


def structured_conv(shape, rank, rng):
    """sum_h s_h a_h (x) b_h (x) c_h plus unit noise, Kaiming-sized: both unfoldings have exactly `rank`
    signal components (a_h, b_h orthonormal), 4-6x above the noise edge."""
    n_out, n_in, kh, kw = shape
    a, _ = np.linalg.qr(rng.standard_normal((n_out, rank)))
    b, _ = np.linalg.qr(rng.standard_normal((n_in, rank)))
    c = rng.standard_normal((kh * kw, rank))
    c /= np.linalg.norm(c, axis=0)
    edge = np.sqrt(n_out) + np.sqrt(n_in * kh * kw)  # noise edge of the output unfolding, unit noise
    s = np.linspace(4, 6, rank) * edge
    w = np.einsum("h,oh,ih,kh->oik", s, a, b, c) + rng.standard_normal((n_out, n_in, kh * kw))
    w *= np.sqrt(2.0 / (n_out * kh * kw)) / w.std()
    return torch.from_numpy(w.reshape(shape)).float()


def make_state(seed, high, low, bn_value, batches, num_classes=2):
    """A resnet18 state_dict whose conv ranks are chosen per layer and whose BNs are recognizable."""
    rng = np.random.default_rng(seed)
    model = build_model("resnet18", num_classes)
    state = model.state_dict()
    for g in conv_groups(model):
        key = g.conv + ".weight"
        short = min(state[key].shape[:2])
        rank = short // 4 if g.conv in high else 2 if g.conv in low else max(2, short // 8)
        state[key] = structured_conv(tuple(state[key].shape), rank, rng)
    for k in state:
        if state[k].ndim == 1 and k.endswith(".weight"):  # BN scale
            state[k] = torch.full_like(state[k], 1.0 + bn_value)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            state[k] = torch.full_like(state[k], bn_value)
        elif k.endswith("running_var"):
            state[k] = torch.full_like(state[k], 1.0 + bn_value)
        elif k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(batches)
    return state


def write_run(root, name, state, arch="resnet18"):
    run = root / name
    run.mkdir(parents=True)
    checkpoint.save_weights(run / "best.pt", {"model": state, "arch": arch, "epoch": 3, "valid_top1": 0.5})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    a = make_state(0, high=A_HIGH, low=B_HIGH, bn_value=0.25, batches=10)
    b = make_state(1, high=B_HIGH, low=A_HIGH, bn_value=0.75, batches=20)
    return {"root": root, "a": write_run(root, "A", a), "b": write_run(root, "B", b), "sa": a, "sb": b}


@pytest.fixture(scope="module")
def merged(runs):
    """Each merge computed once: rule -> (merged state_dict, report)."""
    cache = {}

    def get(rule, lowrank=False):
        if (rule, lowrank) not in cache:
            out = runs["root"] / f"{rule}{'-low' if lowrank else ''}.pt"
            distill(DistillConfig(sources=[runs["a"], runs["b"]], rule=rule, out=out, lowrank=lowrank))
            ckpt = checkpoint.load(out)  # weights_only
            assert ckpt["arch"] == "resnet18"
            cache[rule, lowrank] = ckpt["model"], json.loads(out.with_suffix(".json").read_text()), out
        return cache[rule, lowrank]

    return get


def numerical_rank(weight, rel=1e-4):
    """Rank of the output-channel unfolding from the Gram eigenvalues (a full SVD per layer is slow)."""
    y = unfold(weight, "out")
    y = y if y.shape[0] <= y.shape[1] else y.T
    s = np.sqrt(np.clip(np.linalg.eigvalsh(y @ y.T), 0, None))
    return int(np.sum(s > rel * s.max()))


def layers_by_conv(report):
    return {r["conv"]: r for r in report["layers"]}


# ----------------------------------------------------------------------------------------- structure


def test_conv_groups_pair_each_conv_with_the_bn_that_follows():
    groups = {g.conv: g for g in conv_groups(build_model("resnet18", 2))}
    assert len(groups) == 20
    assert groups["conv1"].bn == "bn1"
    assert groups["layer1.0.conv2"].bn == "layer1.0.bn2"
    assert groups["layer3.0.downsample.0"].bn == "layer3.0.downsample.1"
    assert set(groups["layer2.0.conv1"].keys) == {
        "layer2.0.conv1.weight",
        "layer2.0.bn1.weight",
        "layer2.0.bn1.bias",
        "layer2.0.bn1.running_mean",
        "layer2.0.bn1.running_var",
        "layer2.0.bn1.num_batches_tracked",
    }


def test_rule_weights():
    np.testing.assert_array_equal(rule_weights("kg-select", [0.1, 0.3, 0.2]), [0, 1, 0])
    np.testing.assert_array_equal(rule_weights("kg-select", [0.2, 0.2]), [1, 0])  # ties: the first source
    np.testing.assert_allclose(rule_weights("kg-weighted", [0.1, 0.3]), [0.25, 0.75])
    np.testing.assert_allclose(rule_weights("kg-weighted", [0.0, 0.0]), [0.5, 0.5])  # all zero: uniform
    np.testing.assert_allclose(rule_weights("average", [0.9, 0.1, 0.0]), [1 / 3] * 3)
    with pytest.raises(UserError):
        rule_weights("soup", [0.1, 0.2])


# ------------------------------------------------------------------------------------------- rules


def test_kg_select_takes_the_higher_gain_conv_and_its_bn(runs, merged):
    state, report, _ = merged("kg-select")
    layers = layers_by_conv(report)
    assert len(layers) == 20 and report["rule"] == "kg-select" and report["lowrank"] is False
    for conv, src, _other in [(c, "sa", "sb") for c in A_HIGH] + [(c, "sb", "sa") for c in B_HIGH]:
        rec = layers[conv]
        want = 0 if src == "sa" else 1
        assert rec["chosen"] == want, (conv, [s["kg"] for s in rec["sources"]])
        assert rec["chosen_source"] == str(runs["a" if want == 0 else "b"])
        assert rec["sources"][want]["kg"] > 2 * rec["sources"][1 - want]["kg"]
        for k in [conv + ".weight"] + [
            f"{rec['bn']}.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]:
            assert torch.equal(state[k], runs[src][k]), k
    # every layer came whole from one source, and the metrics are EVBMF's on that source's weight
    for rec in report["layers"]:
        src = runs["sa" if rec["chosen"] == 0 else "sb"]
        assert torch.equal(state[rec["conv"] + ".weight"], src[rec["conv"] + ".weight"])
    m = layer_metrics(runs["sb"]["layer3.0.conv1.weight"])
    assert layers["layer3.0.conv1"]["sources"][1]["kg"] == pytest.approx(m.kg)
    assert layers["layer3.0.conv1"]["sources"][1]["kappa"] == pytest.approx(m.kappa)
    assert report["picks"][str(runs["a"])] + report["picks"][str(runs["b"])] == 20


def test_average_equals_hand_made_average(runs, merged):
    state, report, _ = merged("average")
    assert state.keys() == runs["sa"].keys()
    for k, v in state.items():
        a, b = runs["sa"][k], runs["sb"][k]
        if k.endswith("num_batches_tracked"):
            assert v.item() == 20 and v.dtype == torch.int64
        else:
            assert v.dtype == a.dtype
            torch.testing.assert_close(v, (a + b) / 2, rtol=0, atol=1e-6)
    assert all(r["weights"] == [0.5, 0.5] for r in report["layers"])
    assert report["other"]["head"] == "averaged"


def test_kg_weighted_mean(runs, merged):
    state, report, _ = merged("kg-weighted")
    for rec in report["layers"]:
        gains = np.array([s["kg"] for s in rec["sources"]])
        w = gains / gains.sum() if gains.sum() > 0 else np.full(2, 0.5)
        np.testing.assert_allclose(rec["weights"], w)
        key = rec["conv"] + ".weight"
        torch.testing.assert_close(state[key], w[0] * runs["sa"][key] + w[1] * runs["sb"][key], rtol=1e-5, atol=1e-7)
        mean = rec["bn"] + ".running_mean"
        torch.testing.assert_close(state[mean], w[0] * runs["sa"][mean] + w[1] * runs["sb"][mean])
        assert state[rec["bn"] + ".num_batches_tracked"].item() == 20
    layers = layers_by_conv(report)
    assert all(layers[c]["weights"][0] > 0.6 for c in A_HIGH)
    assert all(layers[c]["weights"][1] > 0.6 for c in B_HIGH)
    torch.testing.assert_close(state["fc.weight"], (runs["sa"]["fc.weight"] + runs["sb"]["fc.weight"]) / 2)


def test_lowrank_reduces_the_rank(merged):
    raw, _, _ = merged("kg-select")
    state, report, _ = merged("kg-select", lowrank=True)
    assert report["lowrank"] is True
    replaced = 0
    for rec in report["layers"]:
        key = rec["conv"] + ".weight"
        low, n_out = rec["lowrank"], rec["shape"][0]
        full = numerical_rank(raw[key])
        if low["replaced"]:
            replaced += 1
            assert numerical_rank(state[key]) == low["rank"] < full == min(rec["shape"][0], np.prod(rec["shape"][1:]))
        else:
            assert torch.equal(state[key], raw[key])
        assert low["channels"] == n_out
    assert replaced == 20
    for k in raw:  # only conv weights change
        if not any(k == r["conv"] + ".weight" for r in report["layers"]):
            assert torch.equal(state[k], raw[k]), k


def test_lowrank_keeps_a_layer_where_evbmf_retains_nothing():
    """Pure noise has EVBMF rank 0; a zero conv would cut the network, so the merged weight stays."""
    groups = conv_groups(build_model("resnet18", 2))[:2]
    noise = torch.randn(64, 3, 7, 7) * 0.05
    signal = structured_conv((64, 64, 3, 3), 8, np.random.default_rng(3))
    state = {"conv1.weight": noise.clone(), "layer1.0.conv1.weight": signal.clone()}
    records = [{}, {}]
    _apply_lowrank(state, groups, records)
    assert records[0]["lowrank"]["replaced"] is False and records[0]["lowrank"]["rank"] == 0
    assert torch.equal(state["conv1.weight"], noise)
    assert records[1]["lowrank"] == {**records[1]["lowrank"], "rank": 8, "replaced": True}
    assert not torch.equal(state["layer1.0.conv1.weight"], signal)


def test_heads_of_different_sizes_keep_the_first(runs, tmp_path):
    c = dict(runs["sa"])
    c["fc.weight"], c["fc.bias"] = torch.randn(5, 512), torch.randn(5)
    run_c = write_run(tmp_path, "C", c)
    out = tmp_path / "m.pt"
    distill(DistillConfig(sources=[runs["b"], run_c], rule="average", out=out))
    state = checkpoint.load(out)["model"]
    assert torch.equal(state["fc.weight"], runs["sb"]["fc.weight"])
    assert "class counts differ" in json.loads(out.with_suffix(".json").read_text())["other"]["head"]


# ------------------------------------------------------------------------------------- as --init


def test_merged_checkpoint_initializes_training(merged, tmp_path):
    state, _, out = merged("kg-select")
    model = build_model("resnet18", 2, init=str(out))
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, state[k]), k
    store = make_store(tmp_path, per_class=8)
    outcome = train(
        TrainConfig(
            store=store,
            dataset="toy",
            out=tmp_path / "B",
            epochs=1,
            batch_size=4,
            workers=0,
            device="cpu",
            progress=False,
            init=str(out),
            mode="deep",
        )
    )
    assert outcome.result is not None and not outcome.interrupted
    assert outcome.result.epochs == 1 and np.isfinite(outcome.result.test["loss"])
    assert (tmp_path / "B" / "result.json").is_file()
    assert json.loads((tmp_path / "B" / "config.json").read_text())["init"] == str(out)


# ------------------------------------------------------------------------------------------- CLI


def cli(*args):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["distill", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def test_cli_success_prints_one_line(runs, tmp_path):
    out = tmp_path / "cli.pt"
    rc, stdout, _ = cli("--sources", runs["a"], runs["b"], "--rule", "kg-select", "--out", out)
    assert rc == 0 and len(stdout.strip().splitlines()) == 1
    assert "merged 2 resnet18 models (kg-select)" in stdout and str(out.with_suffix(".json")) in stdout
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_cli_errors_exit_2_one_line(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    write_run(tmp_path, "other_arch", {"x": torch.zeros(1)}, arch="resnet34")
    bad_shape = dict(runs["sa"])
    bad_shape["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    write_run(tmp_path, "bad_shape", bad_shape)
    missing = {k: v for k, v in runs["sa"].items() if k != "layer2.1.bn2.running_var"}
    write_run(tmp_path, "missing", missing)
    out = tmp_path / "x.pt"
    cases = [
        (["--sources", runs["a"]], "at least 2"),
        (["--sources", runs["a"], tmp_path / "empty"], "no best.pt"),
        (["--sources", runs["a"], tmp_path / "nowhere"], "no best.pt"),
        (["--sources", runs["a"], tmp_path / "other_arch"], "different architectures"),
        (["--sources", runs["a"], tmp_path / "bad_shape"], "layer3.0.conv1.weight"),
        (["--sources", runs["a"], tmp_path / "missing"], "layer2.1.bn2.running_var"),
    ]
    for args, message in cases:
        rc, _, err = cli(*args, "--rule", "average", "--out", out)
        assert rc == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:  # argparse's own choices check
        cli("--sources", runs["a"], runs["b"], "--rule", "soup", "--out", out)
    assert exc.value.code == 2
    with pytest.raises(UserError, match="unknown rule"):
        distill(DistillConfig(sources=[runs["a"], runs["b"]], rule="soup", out=out))
