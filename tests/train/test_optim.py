"""AdamP behaviour, the optimizer / scheduler factories."""

import copy
import io

import pytest
import torch
from torch import nn

from histokt.errors import UserError
from histokt.train.optim import AdamP, build_optimizer, build_scheduler


def _conv_bn(seed=0):
    """conv -> BN (train mode) -> linear: the conv weight is scale-invariant per output channel."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )


def _batches(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(count)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_decreases_a_regression_loss(nesterov):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 3, generator=g)
    model = nn.Linear(5, 3)
    opt = AdamP(model.parameters(), lr=0.05, nesterov=nesterov)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_scale_invariant_weight_gets_the_projected_update():
    model = _conv_bn()
    conv = model[0].weight
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = conv.detach().clone()
    rows = before.reshape(4, -1)
    grad_cos = nn.functional.cosine_similarity(conv.grad.reshape(4, -1), rows, dim=1).abs()
    assert grad_cos.max() < 0.1 / 27**0.5  # BN makes the gradient orthogonal to each channel's weight

    # A plain Adam step from the same gradient, for comparison: its update has a radial part.
    ref = nn.Parameter(before.clone())
    ref.grad = conv.grad.clone()
    torch.optim.Adam([ref], lr=0.01).step()
    adam_update = (ref.detach() - before).reshape(4, -1)

    AdamP(model.parameters(), lr=0.01).step()
    update = (conv.detach() - before).reshape(4, -1)

    dots = (update * rows).sum(dim=1) / (update.norm(dim=1) * rows.norm(dim=1))
    assert dots.abs().max() < 1e-5
    assert ((adam_update * rows).sum(dim=1) / (adam_update.norm(dim=1) * rows.norm(dim=1))).abs().max() > 1e-3
    unit = rows / rows.norm(dim=1, keepdim=True)
    expected = adam_update - unit * (adam_update * unit).sum(dim=1, keepdim=True)
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-9)


def test_projected_weights_decay_by_wd_ratio():
    """Decoupled decay p *= 1 - lr * wd * wd_ratio on a projected (scale-invariant) weight."""
    lr, wd = 0.01, 0.5
    results = []
    for decay in (0.0, wd):
        model = _conv_bn()
        _train(model, AdamP(model.parameters(), lr=lr, weight_decay=decay), _batches(1))
        results.append(model[0].weight.detach())
    start = _conv_bn()[0].weight.detach()
    # float32 cancellation in the difference of two ~0.1 weights: ~1e-8 noise on a ~5e-5 signal
    torch.testing.assert_close(results[1] - results[0], -start * lr * wd * 0.1, rtol=1e-3, atol=1e-7)


def test_non_scale_invariant_weights_step_like_adamw():
    """Without projection AdamP is Adam with bias correction and decoupled decay, i.e. AdamW."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    models = []
    for cls in (AdamP, torch.optim.AdamW):
        torch.manual_seed(3)
        model = nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.01, weight_decay=0.1)
        for _ in range(5):
            opt.zero_grad()
            # target 0: each weight row's gradient is aligned with the row, so no projection.
            model(x).pow(2).mean().backward()
            opt.step()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_gives_bitwise_identical_steps():
    batches = _batches(6)
    model = _conv_bn()
    opt = AdamP(model.parameters(), lr=0.01, weight_decay=5e-4)
    _train(model, opt, batches[:3])
    model_state = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    _train(model, opt, batches[3:])

    resumed = _conv_bn(seed=99)
    resumed.load_state_dict(model_state)
    opt2 = AdamP(resumed.parameters(), lr=0.01, weight_decay=5e-4)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    _train(resumed, opt2, batches[3:])

    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state[resumed[0].weight]["step"] == 6


def test_adamp_is_deterministic():
    runs = []
    for _ in range(2):
        model = _conv_bn()
        _train(model, AdamP(model.parameters(), lr=0.01, weight_decay=5e-4), _batches(3))
        runs.append(model.state_dict())
    for a, b in zip(runs[0].values(), runs[1].values()):
        assert torch.equal(a, b)


def test_build_optimizer_kinds():
    params = [nn.Parameter(torch.zeros(3, 2))]
    adamp = build_optimizer("AdamP", params, 1e-4)
    group = adamp.param_groups[0]
    assert isinstance(adamp, AdamP)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 1e-8, 5e-4)
    assert (group["delta"], group["wd_ratio"], group["nesterov"]) == (0.1, 0.1, False)

    sgd = build_optimizer("sgd", params, 0.03)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.9, 5e-4)
    assert type(build_optimizer("adam", params, 1e-3)) is torch.optim.Adam
    adamw = build_optimizer("adamw", params, 1e-3, weight_decay=0.01)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01


def test_build_optimizer_errors():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(UserError, match=r"^unknown optimizer 'x'; choose one of: adamp, sgd, adam, adamw, adas$"):
        build_optimizer("x", params, 1e-3)
    with pytest.raises(UserError, match="learning rate"):
        build_optimizer("sgd", params, 0)


def _lrs(scheduler, epochs):
    """LR in force during each epoch, stepping the scheduler once per epoch."""
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_build_scheduler():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1e-3)
    lrs = _lrs(build_scheduler("step", opt, 20, 0.5), 45)
    assert lrs[0] == lrs[19] == 1e-3 and lrs[20] == lrs[39] == 5e-4 and lrs[40] == 2.5e-4

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.03)
    assert set(_lrs(build_scheduler("none", opt, 20, 0.5), 100)) == {0.03}


def test_build_scheduler_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(UserError, match=r"^unknown scheduler 'cosine'; choose one of: step, none$"):
        build_scheduler("cosine", opt, 20, 0.5)
    with pytest.raises(UserError, match="step_size"):
        build_scheduler("step", opt, 0, 0.5)
    with pytest.raises(UserError, match="gamma"):
        build_scheduler("step", opt, 20, 0.0)
