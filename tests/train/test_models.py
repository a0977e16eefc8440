"""histokt.models: heads, the three inits, weights-only loading, fine-tuning freeze and BN modes (CPU, fast)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from histokt.errors import UserError
from histokt.train.models import (
    apply_bn_mode,
    build_model,
    freeze_encoder,
    head_names,
    imagenet_cache_path,
    stand_in_imagenet,
)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _encoder_equal(model, sd, head_prefix="fc."):
    msd = model.state_dict()
    keys = [k for k in sd if not k.startswith(head_prefix)]
    assert keys and all(k in msd for k in keys)
    return all(torch.equal(msd[k], sd[k]) for k in keys)


def _batch(n=4, size=64, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


# --------------------------------------------------------------------------------------------- heads


def test_resnet18_head_sized_to_target():
    model = build_model("resnet18", num_classes=7)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 7 and model.fc.in_features == 512
    assert head_names(model) == {"fc.weight", "fc.bias"}
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_mobilenet_v3_small_head_sized_to_target():
    model = build_model("mobilenet_v3_small", num_classes=4)
    assert model.classifier[-1].out_features == 4
    assert head_names(model) == {"classifier.3.weight", "classifier.3.bias"}
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


@pytest.mark.parametrize(
    "arch, names",
    [
        ("densenet121", {"classifier.weight", "classifier.bias"}),
        ("vgg11", {"classifier.6.weight", "classifier.6.bias"}),
        ("efficientnet_b0", {"classifier.1.weight", "classifier.1.bias"}),
        ("vit_b_16", {"heads.head.weight", "heads.head.bias"}),
        ("swin_t", {"head.weight", "head.bias"}),
    ],
)
def test_head_location_other_families(arch, names):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(arch, num_classes=5)
    assert head_names(model) == names
    assert all(p.shape[0] == 5 for n, p in model.named_parameters() if n in names)


def test_unsupported_head_is_a_user_error():
    with pytest.raises(UserError, match="unsupported model"):
        build_model("squeezenet1_0", num_classes=3)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(UserError) as exc:
        build_model("resnet81", num_classes=3)
    msg = str(exc.value)
    assert "resnet81" in msg and "resnet18" in msg and "\n" not in msg
    with pytest.raises(UserError, match="not a torchvision classification model"):
        build_model("fasterrcnn_resnet50_fpn", num_classes=3)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_num_classes(bad):
    with pytest.raises(UserError, match="num_classes"):
        build_model("resnet18", num_classes=bad)


# ------------------------------------------------------------------------------------------ ImageNet


def test_imagenet_cache_path_follows_torch_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert imagenet_cache_path("resnet18") == tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (
        imagenet_cache_path("resnet18") == tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    )


def test_imagenet_init_loads_encoder_exactly(torch_home):
    path = stand_in_imagenet(imagenet_cache_path("resnet18"), "resnet18", seed=3)
    assert path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert sd["fc.weight"].shape == (1000, 512)

    model = build_model("resnet18", num_classes=9, init="imagenet")
    assert _encoder_equal(model, sd)  # weights AND BN buffers (the stand-in randomises running stats)
    assert model.fc.weight.shape == (9, 512)
    # a fresh default-init head, not a slice of the file's 1000-class head
    assert not torch.equal(model.fc.weight, sd["fc.weight"][:9])
    bound = 1 / 512**0.5
    assert model.fc.weight.abs().max() <= bound and model.fc.bias.abs().max() <= bound


def test_stand_in_is_seeded_and_keeps_global_rng(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = torch.load(stand_in_imagenet(tmp_path / "a.pth", seed=0), weights_only=True)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = torch.load(stand_in_imagenet(tmp_path / "b.pth", seed=0), weights_only=True)
    c = torch.load(stand_in_imagenet(tmp_path / "c.pth", seed=1), weights_only=True)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    conv4d = [k for k, v in a.items() if v.dim() == 4]
    assert len(conv4d) == 20  # method.md §3: 20 4-D conv tensors incl. three 1x1 downsample


def test_imagenet_missing_file_names_path_and_how_to_stage(torch_home):
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=3, init="imagenet")
    msg = str(exc.value)
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert "TORCH_HOME" in msg and "login node" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04truncated"])
def test_imagenet_corrupt_file(torch_home, content):
    path = imagenet_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=3, init="imagenet")
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_imagenet_truncated_file(torch_home):
    path = stand_in_imagenet(imagenet_cache_path("resnet18"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        build_model("resnet18", num_classes=3, init="imagenet")


def test_imagenet_file_without_num_batches_tracked(torch_home):
    """Older torchvision files predate BN's num_batches_tracked; they still load."""
    path = stand_in_imagenet(imagenet_cache_path("resnet18"))
    sd = {k: v for k, v in torch.load(path, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    model = build_model("resnet18", num_classes=3, init="imagenet")
    assert _encoder_equal(model, sd)


def test_imagenet_init_other_arch(torch_home):
    sd = torch.load(
        stand_in_imagenet(imagenet_cache_path("mobilenet_v3_small"), "mobilenet_v3_small"), weights_only=True
    )
    model = build_model("mobilenet_v3_small", num_classes=2, init="imagenet")
    assert _encoder_equal(model, sd, "classifier.3.")
    assert model.classifier[3].weight.shape == (2, 1024)


def test_imagenet_init_drops_googlenet_aux_heads(torch_home):
    sd = torch.load(stand_in_imagenet(imagenet_cache_path("googlenet"), "googlenet"), weights_only=True)
    assert any(k.startswith("aux1.") for k in sd)  # the file's layout, as torchvision ships it
    model = build_model("googlenet", num_classes=3, init="imagenet")
    assert not any(k.startswith("aux") for k in model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if not k.startswith(("aux", "fc.")))
    model.train()
    assert isinstance(model(torch.randn(2, 3, 64, 64)), torch.Tensor)


# ---------------------------------------------------------------------------------------------- PATH


@pytest.mark.parametrize("wrap", [True, False], ids=["checkpoint-dict", "plain-state-dict"])
def test_path_init(tmp_path, wrap):
    source = build_model("resnet18", num_classes=3)
    with torch.no_grad():
        source.bn1.running_mean.uniform_()  # non-default buffers must travel too
    sd = source.state_dict()
    path = tmp_path / "best.pt"
    torch.save({"model": sd, "epoch": 12, "val_acc1": 0.5, "config": {"lr": 0.03}} if wrap else sd, path)

    model = build_model("resnet18", num_classes=5, init=path)  # the source head size (3) differs
    assert _encoder_equal(model, sd)
    assert model.fc.weight.shape == (5, 512)
    model2 = build_model("resnet18", num_classes=5, init=str(path))
    assert _encoder_equal(model2, sd)


def test_path_init_strips_dataparallel_prefix(tmp_path):
    sd = build_model("resnet18", num_classes=3).state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "dp.pt")
    assert _encoder_equal(build_model("resnet18", num_classes=3, init=tmp_path / "dp.pt"), sd)


def test_path_init_other_arch_refused(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save({"model": build_model("resnet34", num_classes=3).state_dict()}, path)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=3, init=path)
    msg = str(exc.value)
    assert "different architecture?" in msg and "layer1.2." in msg and str(path) in msg and "\n" not in msg


def test_path_init_shape_mismatch_refused(tmp_path):
    sd = build_model("resnet18", num_classes=3).state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"conv1\.weight.*different architecture\?"):
        build_model("resnet18", num_classes=3, init=tmp_path / "bad.pt")


def test_path_init_missing_keys_refused(tmp_path):
    sd = build_model("resnet18", num_classes=3).state_dict()
    del sd["layer4.1.bn2.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"missing keys layer4\.1\.bn2\.weight"):
        build_model("resnet18", num_classes=3, init=tmp_path / "bad.pt")


class Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path):
    Path(path).write_text("code ran")


def test_pickled_object_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": build_model("resnet18", num_classes=3).state_dict(), "args": Payload(str(marker))}, path)
    with pytest.raises(UserError) as exc:
        build_model("resnet18", num_classes=3, init=path)
    assert "non-tensor" in str(exc.value) and "weights_only" in str(exc.value)
    assert not marker.exists()


def test_path_init_not_a_state_dict(tmp_path):
    torch.save({"model": {"a": 1}}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a state_dict"):
        build_model("resnet18", num_classes=3, init=tmp_path / "x.pt")
    torch.save([1, 2], tmp_path / "y.pt")
    with pytest.raises(UserError, match="neither a state_dict"):
        build_model("resnet18", num_classes=3, init=tmp_path / "y.pt")


def test_path_init_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        build_model("resnet18", num_classes=3, init=tmp_path / "nope.pt")


# --------------------------------------------------------------------------------------- fine-tuning


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _step(model, num_classes=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)  # all params: safe
    x, y = _batch(num_classes=num_classes)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_freeze_encoder_trains_only_head(bn):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3)
    freeze_encoder(model, bn=bn)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head_names(model)
    model.train()
    apply_bn_mode(model)
    before = _snapshot(model)
    _step(model)
    after = model.state_dict()
    params = dict(model.named_parameters())
    for name in params:
        if name in head_names(model):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    running = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    changed = [k for k in running if not torch.equal(before[k], after[k])]
    if bn == "train":  # the paper's fine-tuning: frozen weights, but BN running stats still move
        assert set(changed) == set(running)
    else:
        assert changed == []
        assert model.training and model.fc.training


def test_bn_eval_needs_reapplying_after_train():
    model = freeze_encoder(build_model("resnet18", num_classes=3), bn="eval")
    model.train()  # resets every BN to train mode ...
    assert model.bn1.training
    apply_bn_mode(model)  # ... so the loop re-applies the remembered mode
    assert not model.bn1.training and not model.layer4[1].bn2.training
    model.eval()
    apply_bn_mode(model)
    assert not any(m.training for m in model.modules())


def test_deep_tuning_default_trains_everything():
    model = build_model("resnet18", num_classes=3)
    assert all(p.requires_grad for p in model.parameters())
    apply_bn_mode(model)  # no freeze: "train", a no-op in train mode
    assert model.bn1.training


def test_bad_bn_mode():
    with pytest.raises(UserError, match="bn mode"):
        freeze_encoder(build_model("resnet18", num_classes=3), bn="frozen")
