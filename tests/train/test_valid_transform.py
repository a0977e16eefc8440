"""--valid-transform and --protocol in a real Trainer: augmented validation images (the original's checkpoint
choice) drawn per epoch, the same on the loader and the device path, and the deviations result.json states."""

import json

import pytest
import torch

from histokt.train import distributed
from histokt.train.config import TrainConfig, resolved
from histokt.train.launch import train
from histokt.train.loop import Trainer
from tests.fixtures.trainstore import make_store
from tests.train.test_loop import cfg, finished


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("valid-transform"), per_class=12)


def trainer(store, out, **kw) -> Trainer:
    return Trainer(resolved(cfg(store, out, **kw), "folder"), distributed.World(), torch.device("cpu"))


def valid_loss(t: Trainer, epoch: int) -> float:
    torch.manual_seed(0)
    return t.evaluate("valid", t.model, epoch)["loss"]


@pytest.mark.parametrize("data_on, warp", [("loader", "loader"), ("loader", "device"), ("device", "device")])
def test_train_transform_validates_on_new_draws_each_epoch(store, tmp_path, data_on, warp):
    augmented = trainer(store, tmp_path / "a", valid_transform="train", data_on=data_on, augment_on=warp)
    clean = trainer(store, tmp_path / "c", valid_transform="clean", data_on=data_on, augment_on=warp)
    clean.model.load_state_dict(augmented.model.state_dict())
    a0, a1, again = valid_loss(augmented, 0), valid_loss(augmented, 1), valid_loss(augmented, 0)
    c0, c1 = valid_loss(clean, 0), valid_loss(clean, 1)
    assert c0 == c1  # clean images: the epoch changes nothing
    assert a0 != c0 and a1 != c0 and a0 != a1  # augmented, and drawn anew each epoch
    assert a0 == again  # from (seed, epoch, index): a resumed run sees the same images


def test_validation_draws_are_their_own_and_no_augment_means_clean_validation(store, tmp_path):
    from histokt.store.augment import Augment

    train_draws, valid_draws = Augment(seed=0), Augment(seed=0, stream=1)
    assert (train_draws.params(5, 2, 64, 64) != valid_draws.params(5, 2, 64, 64)).any()
    assert (Augment(seed=0, stream=1).params(5, 2, 64, 64) == valid_draws.params(5, 2, 64, 64)).all()
    off = trainer(store, tmp_path / "n", valid_transform="train", augment=False, data_on="loader")
    assert off.valid_augment is None and valid_loss(off, 0) == valid_loss(off, 1)


def test_the_card_of_a_dataset_comes_from_the_store(store, tmp_path):
    from histokt.train.launch import card_of

    assert card_of(cfg(store, tmp_path)) == "folder"  # the dataset is named "toy"
    assert card_of(TrainConfig(store=store, dataset="absent", out=tmp_path)) is None


def test_loader_and_device_paths_draw_the_same_validation_images(store, tmp_path):
    loader = trainer(store, tmp_path / "l", valid_transform="train", data_on="loader", augment_on="device")
    device = trainer(store, tmp_path / "d", valid_transform="train", data_on="device", augment_on="device")
    device.model.load_state_dict(loader.model.state_dict())
    assert valid_loss(loader, 3) == pytest.approx(valid_loss(device, 3), rel=1e-6)


def test_the_paper_protocol_resolves_its_defaults_and_result_json_lists_what_differs(store, tmp_path):
    paper = resolved(cfg(store, tmp_path, mode="scratch", protocol="paper"), "bach")
    assert (paper.optimizer, paper.precision, paper.valid_transform) == ("adas", "fp32", "train")
    assert resolved(cfg(store, tmp_path, mode="scratch", protocol="paper"), "adp").valid_transform == "clean"
    ours = resolved(cfg(store, tmp_path, mode="scratch"), "bach")
    assert (ours.optimizer, ours.precision, ours.valid_transform) == ("sgd", "auto", "clean")

    result = finished(train(cfg(store, tmp_path / "run", mode="scratch")))
    doc = json.loads((tmp_path / "run" / "result.json").read_text())
    assert doc["protocol"] == "histokt" and doc["deviations"] == result.deviations
    whats = [d["what"] for d in doc["deviations"]]
    # a folder card's store (split grouped, 64 px patches without overlap); the test recipe's epochs and batch;
    # SGD for Stage A; clean validation
    assert whats == [
        "folder split",
        "patches",
        "folder stride",
        "epochs",
        "batch_size",
        "stage A optimizer",
        "folder validation transform",
    ]
    assert doc["config"]["valid_transform"] == "clean"


def test_a_paper_protocol_cell_trains_with_adas_and_states_only_what_its_data_and_recipe_change(
    store, tmp_path, monkeypatch
):
    from histokt.train import adas
    from tests.train.test_adas import _cheap_kg

    calls: list = []
    monkeypatch.setattr(adas, "layer_kg", _cheap_kg(calls))  # real EVBMF: seconds per epoch on this CPU
    finished(train(cfg(store, tmp_path / "run", mode="scratch", protocol="paper", epochs=2)))
    doc = json.loads((tmp_path / "run" / "result.json").read_text())
    assert doc["config"]["optimizer"] == "adas" and len(calls) == 2 * 17  # Adas scored 17 convs each epoch
    assert doc["config"]["valid_transform"] == "train" and doc["settings"]["precision"] == "fp32"
    assert doc["protocol"] == "paper"
    assert [d["what"] for d in doc["deviations"]] == [
        "folder split",
        "patches",
        "folder stride",
        "epochs",
        "batch_size",
    ]
