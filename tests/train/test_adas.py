"""Adas (paper Stage A, docs/method.md §4.4): the per-epoch LR update by hand, the SGD step, exact resume."""

import io
import json
import signal
import subprocess

import pytest
import torch
from torch import nn

from histokt.errors import UserError
from histokt.train import adas, checkpoint
from histokt.train.adas import Adas, AdasSchedule
from histokt.train.models import build_model
from histokt.train.optim import build_optimizer, build_scheduler
from tests.fixtures.trainstore import make_store
from tests.train.test_ckpt_policy import assert_same_run
from tests.train.test_loop import cli_args, wait_for


def _p(*shape, dtype=torch.float32):
    return nn.Parameter(torch.zeros(*shape, dtype=dtype))


def _lrs(opt):
    return [g["lr"] for g in opt.param_groups]


# ------------------------------------------------------------------------------------- the LR update by hand


def test_the_update_rule_by_hand_with_given_knowledge_gains():
    """Two scored convs (A, B) among BN/bias/1x1/fc tensors; eta_0 0.03, beta 0.98, gamma 0.5, step_size 2."""
    a_w, a_b, bn_w, bn_b = _p(4, 1, 3, 3), _p(4), _p(4), _p(4)
    one_by_one, b_w, fc_w, fc_b = _p(4, 4, 1, 1), _p(3, 4, 3, 3), _p(2, 12), _p(2)
    params = [a_w, a_b, bn_w, bn_b, one_by_one, b_w, fc_w, fc_b]
    opt = Adas(params, lr=0.03)
    kg = {}
    sched = AdasSchedule(opt, step_size=2, gamma=0.5, kg=lambda w: kg[w])
    assert sched.scored == [0, 5]  # the 1x1 conv (index 4) is masked: not scored
    assert _lrs(opt) == [0.03] * 8

    # epoch 0: Delta = eta_0, v = max(0.98*0 + 1*0.03, 1e-10) = 0.03 for both; the KGs are only remembered
    kg.update({a_w: 0.5, b_w: 0.0})
    sched.step()
    assert sched.velocity == [0.03, 0.03] and sched.last_kg == [0.5, 0.0] and sched.zeta == 1.0
    assert _lrs(opt) == [0.03] * 8

    # epoch 1 (zeta 1): A ready, Delta = 0.52 - 0.5 = 0.02, v = max(0.98*0.03 + 0.02, 1e-10) = 0.0494
    #                   B KG 0, not ready: Delta = 0.03 - 0.98*0.03 = 0.0006, v = 0.0294 + 0.0006 = 0.03
    # tensors 1-4 (bias, BN, BN, 1x1 conv) take A's 0.0494, fc takes B's 0.03
    kg.update({a_w: 0.52, b_w: 0.0})
    sched.step()
    assert sched.velocity == pytest.approx([0.0494, 0.03], rel=1e-12, abs=0)
    assert _lrs(opt) == pytest.approx([0.0494] * 5 + [0.03] * 3, rel=1e-12, abs=0)
    assert sched.ready == [True, False] and sched.zeta == 1.0

    # epoch 2 = step_size: zeta = 0.5.
    #   A: Delta = 0.3 - 0.52 = -0.22, v = max(0.98*0.0494 + 0.5*(-0.22), 1e-10) = max(-0.061588, 1e-10) = 1e-10
    #   B: KG 0 still: Delta = 0.03 - 0.98*0.03 = 0.0006, v = 0.98*0.03 + 0.5*0.0006 = 0.0297
    kg.update({a_w: 0.3, b_w: 0.0})
    sched.step()
    assert sched.zeta == 0.5
    assert sched.velocity == pytest.approx([1e-10, 0.0297], rel=1e-12, abs=0)
    assert _lrs(opt) == pytest.approx([1e-10] * 5 + [0.0297] * 3, rel=1e-12, abs=0)

    # epoch 3 (zeta 0.5): A's KG falls to 0, but A is ready for good: Delta = 0 - 0.3,
    #   v = max(0.98*1e-10 - 0.15, 1e-10) = 1e-10 (as not-ready it would be 0.98e-10 + 0.5*(0.03 - 0.98e-10))
    #   B becomes ready: Delta = 0.2 - 0 = 0.2, v = 0.98*0.0297 + 0.5*0.2 = 0.129106
    kg.update({a_w: 0.0, b_w: 0.2})
    sched.step()
    assert sched.velocity == pytest.approx([1e-10, 0.129106], rel=1e-12, abs=0)
    assert _lrs(opt) == pytest.approx([1e-10] * 5 + [0.129106] * 3, rel=1e-12, abs=0)
    assert sched.ready == [True, True] and sched.epoch == 4 and sched.get_last_lr() == _lrs(opt)


@pytest.mark.parametrize("value, ready", [(0.0, False), (1e-8, False), (-1e-8, False), (1.1e-8, True), (-1.1e-8, True)])
def test_not_ready_means_a_knowledge_gain_within_1e8_of_zero(value, ready):
    """The reference's np.isclose(KG, 0): |KG| <= 1e-8 (atol). Epoch 1, zeta 1, v = 0.03 after epoch 0:
    not ready: v = 0.98*0.03 + (0.03 - 0.98*0.03) = 0.03; ready: v = 0.0294 + (KG - 0) = 0.0294 + KG."""
    conv = _p(2, 2, 3, 3)
    opt = Adas([conv], lr=0.03)
    kg = [0.0]
    sched = AdasSchedule(opt, kg=lambda w: kg[0])
    sched.step()
    kg[0] = value
    sched.step()
    assert sched.ready == [ready]
    assert _lrs(opt) == pytest.approx([0.0294 + value if ready else 0.03], rel=1e-12, abs=0)


def test_a_masked_first_parameter_keeps_its_own_lr_scaled_by_gamma():
    """The reference scales the whole LR vector by gamma, then overwrites it: tensor 0, if masked, keeps its own."""
    bias, conv = _p(3), _p(3, 3, 3, 3)
    opt = Adas([bias, conv], lr=0.03)
    sched = AdasSchedule(opt, step_size=1, gamma=0.5, kg=lambda w: 0.0)
    sched.step()  # epoch 0: conv v = 0.03; the bias keeps 0.03
    assert _lrs(opt) == [0.03, 0.03]
    sched.step()  # epoch 1: zeta 0.5; bias 0.03*0.5 = 0.015; conv v = 0.0294 + 0.5*(0.03 - 0.0294) = 0.0297
    assert _lrs(opt) == pytest.approx([0.015, 0.0297], rel=1e-12, abs=0)


def _kernel():
    return torch.tensor([[1.0, 2.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)


def _rank_one(n_out, n_in):
    """W[o, i] = K: both unfoldings have rank 1 (rows all equal)."""
    return torch.ones(n_out, n_in, 1, 1, dtype=torch.float64) * _kernel()


def _rank_two(n):
    """W = e_0 (x) e_1 (x) K + e_2 (x) e_3 (x) K: both unfoldings have two orthogonal components of equal norm."""
    w = torch.zeros(n, n, 3, 3, dtype=torch.float64)
    w[0, 1] = w[2, 3] = _kernel()
    return w


def test_the_default_knowledge_gain_is_evbmf_of_both_unfoldings():
    """Real EVBMF on weights whose KG follows by hand: EVBMF keeps exactly the nonzero singular values of an
    exact low-rank unfolding, and equal singular values shrink alike, so G_d = (1/N_d) * sum d_h/d_1 = r/N_d;
    the zero weight keeps nothing (no value: the previous one, 0 before any)."""
    a = nn.Parameter(_rank_one(8, 8))  # G_in = G_out = 1/8: G = 0.125
    b = nn.Parameter(torch.zeros(8, 4, 3, 3, dtype=torch.float64))  # G = 0
    assert adas.layer_kg(a) == pytest.approx((0.125, 0.125), abs=1e-12)
    assert adas.layer_kg(b) == (None, None)
    opt = Adas([a, b], lr=0.03)
    sched = AdasSchedule(opt)  # paper values: step_size 25, gamma 0.5, beta 0.98
    sched.step()
    assert sched.last_kg == pytest.approx([0.125, 0.0], abs=1e-12)
    with torch.no_grad():
        a.copy_(_rank_two(8))  # G = (2/8 + 2/8)/2 = 0.25
        b.copy_(_rank_one(8, 4))  # G_out = 1/8 (8 rows), G_in = 1/4 (4 rows): G = (0.25 + 0.125)/2 = 0.1875
    sched.step()
    assert sched.last_kg == pytest.approx([0.25, 0.1875], abs=1e-12)
    # A: v = 0.98*0.03 + (0.25 - 0.125) = 0.1544; B (now ready): v = 0.98*0.03 + (0.1875 - 0) = 0.2169
    assert _lrs(opt) == pytest.approx([0.1544, 0.2169], abs=1e-12)


def test_resnet18_scores_its_17_kxk_convs_and_the_rest_follow_the_preceding_tensor():
    model = build_model("resnet18", 2)
    named = list(model.named_parameters())
    opt = build_optimizer("adas", model.parameters(), 0.03)
    seen: list = []

    def kg(w):  # epoch 0: 0 everywhere; epoch 1: 0.01, 0.02, ... in call order
        seen.append(w)
        return 0.0 if len(seen) <= 17 else (len(seen) - 17) / 100

    sched = AdasSchedule(opt, kg=kg)
    sched.step()
    sched.step()
    convs = [p for _, p in named if p.dim() == 4]
    kxk = [p for p in convs if p.shape[-1] > 1]
    assert len(convs) == 20 and len(kxk) == 17
    assert len(seen) == 34 and all(a is b for a, b in zip(seen, kxk + kxk))
    lr = {name: g["lr"] for (name, _), g in zip(named, opt.param_groups)}
    # the k-th scored conv: v = 0.98*0.03 + (k/100 - 0) = 0.0294 + k/100 (ready: KG > 0)
    for k, p in enumerate(kxk, start=1):
        i = next(j for j, (_, q) in enumerate(named) if q is p)
        assert opt.param_groups[i]["lr"] == pytest.approx(0.0294 + k / 100, rel=1e-12, abs=0)
    for i, (name, p) in enumerate(named):
        if not (p.dim() == 4 and p.shape[-1] > 1):
            assert opt.param_groups[i]["lr"] == opt.param_groups[i - 1]["lr"], name
    # a 1x1 downsample conv takes the LR of the tensor before it: its block's bn2.bias, i.e. conv2's
    assert lr["layer2.0.downsample.0.weight"] == lr["layer2.0.bn2.bias"] == lr["layer2.0.conv2.weight"]
    assert lr["layer2.0.downsample.0.weight"] == pytest.approx(0.0294 + 0.07, rel=1e-12, abs=0)
    assert lr["fc.bias"] == lr["layer4.1.conv2.weight"] == pytest.approx(0.0294 + 0.17, rel=1e-12, abs=0)
    assert opt.param_groups[0]["lr"] == lr["conv1.weight"] == pytest.approx(0.0294 + 0.01, rel=1e-12, abs=0)


# --------------------------------------------------------------------------------------- the optimizer step


def test_a_step_is_momentum_sgd_with_l2_and_the_tensors_own_lr():
    a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = build_optimizer("adas", [a, b], 0.03)  # momentum 0.9, wd 5e-4 by default
    assert isinstance(opt, Adas) and len(opt.param_groups) == 2
    group = opt.param_groups[0]
    assert (group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]) == (0.9, 0, 5e-4, False)
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.1, 0.01
    for _ in range(2):
        a.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
        b.grad = torch.tensor([-1.0], dtype=torch.float64)
        opt.step()
        # step 1: d = g + 5e-4 w, buf = d, w -= lr buf:
        #   a: d = [0.5005, 0.249], a = [1 - 0.05005, -2 - 0.0249] = [0.94995, -2.0249]
        #   b: d = -0.9985, b = 3 + 0.009985 = 3.009985
        # step 2: d = g + 5e-4 w, buf = 0.9 buf + d, w -= lr buf:
        #   a: d = [0.500474975, 0.24898755], buf = [0.950924975, 0.47308755], a = [0.8548575025, -2.072208755]
        #   b: d = -0.9984950075, buf = -1.8971450075, b = 3.009985 + 0.018971450075 = 3.028956450075
    assert a.tolist() == pytest.approx([0.8548575025, -2.072208755], abs=1e-12)
    assert b.tolist() == pytest.approx([3.028956450075], abs=1e-12)


def test_factories():
    params = [_p(2, 2, 3, 3), _p(2)]
    opt = build_optimizer("Adas", params, 0.03, weight_decay=1e-4, momentum=0.8)
    assert isinstance(opt, Adas) and [g["params"][0] for g in opt.param_groups] == params
    assert (opt.param_groups[1]["momentum"], opt.param_groups[1]["weight_decay"]) == (0.8, 1e-4)
    for name in ("step", "none"):  # Adas brings its own schedule: no StepLR or constant LR acts on it
        sched = build_scheduler(name, opt, 25, 0.5)
        assert isinstance(sched, AdasSchedule)
        assert (sched.step_size, sched.gamma, sched.beta, sched.init_lr) == (25, 0.5, 0.98, 0.03)
    with pytest.raises(UserError, match="step_size"):
        build_scheduler("step", opt, 0, 0.5)
    with pytest.raises(UserError, match="gamma"):
        build_scheduler("none", opt, 25, 0.0)
    with pytest.raises(UserError, match="unknown scheduler"):
        build_scheduler("cosine", opt, 25, 0.5)
    with pytest.raises(TypeError):
        AdasSchedule(torch.optim.SGD(params, lr=0.1))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ resuming


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),  # masked
        nn.Conv2d(4, 4, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )


def _kg(clock):
    """A cheap KG that follows the weights, but: conv 2's is 0 (never ready), and every KG is 0 at epoch 2, the
    first after the resume (where conv 1, ready since epoch 1, must stay ready)."""

    def kg(w):
        if clock[0] == 2 or (w.shape[0] == 4 and w.shape[1] == 4):
            return 0.0
        return float(w.detach().abs().mean())

    return kg


def _epochs(model, opt, sched, clock, epochs):
    g = torch.Generator().manual_seed(100 + epochs.start)
    for epoch in epochs:
        for _ in range(3):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        clock[0] = epoch
        sched.step()


def _build(clock):
    model = _net()
    opt = build_optimizer("adas", model.parameters(), 0.03)
    return model, opt, AdasSchedule(opt, step_size=1, gamma=0.5, kg=_kg(clock))


def test_state_dicts_round_trip_to_the_uninterrupted_run():
    clock = [0]
    model, opt, sched = _build(clock)
    _epochs(model, opt, sched, clock, range(0, 2))
    _epochs(model, opt, sched, clock, range(2, 4))
    assert sched.ready == [True, False] and sched.zeta == 0.125  # 1 * 0.5**3, epochs 1, 2, 3

    clock2 = [0]
    model2, opt2, sched2 = _build(clock2)
    _epochs(model2, opt2, sched2, clock2, range(0, 2))
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as histokt.train.checkpoint loads
    assert saved["sched"]["epoch"] == 2 and saved["sched"]["ready"] == [True, False]

    clock3 = [0]
    model3, opt3, sched3 = _build(clock3)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    _epochs(model3, opt3, sched3, clock3, range(2, 4))
    for (name, p), q in zip(model.named_parameters(), model3.parameters()):
        assert torch.equal(p, q), name
    assert _lrs(opt3) == _lrs(opt) and len(set(_lrs(opt))) > 1
    assert sched3.state_dict() == sched.state_dict()

    with pytest.raises(ValueError, match="does not fit"):  # another model's state is refused
        AdasSchedule(Adas([_p(2, 2, 3, 3)], lr=0.03)).load_state_dict(saved["sched"])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("adas"), per_class=8)  # 12 train patches: 3 steps of 4 an epoch


def _cheap_kg(calls):
    """EVBMF of ResNet18's 17 convs takes seconds on a small CPU: a cheap KG that follows the weights instead."""

    def kg(w):
        calls.append(tuple(w.shape))
        return float(w.detach().abs().mean())

    return kg


def test_a_sigkilled_adas_run_resumes_exactly(store, tmp_path, cli_env):
    """ResNet18 through the CLI, real EVBMF, 3 epochs of 3 steps, zeta halved every epoch. SIGKILLed after a
    checkpoint in epoch 1 or 2, the rerun needs the checkpoint's Adas state (the last epoch's KGs, velocities,
    zeta, epoch) for the next update, whose LRs the rest trains with: it must end bit for bit as the
    uninterrupted run."""
    kw = dict(optimizer="adas", step_size=1, batch_size=4, ckpt_every_steps=1)
    ref = tmp_path / "ref"
    assert subprocess.run(cli_args(store, ref, **kw), env=cli_env).returncode == 0
    out = tmp_path / "run"
    proc = subprocess.Popen(cli_args(store, out, **kw), env=cli_env)
    wait_for(lambda: (out / "previous.pt").exists() and checkpoint.load_latest(out)[0]["step"] >= 4, proc, "step 4")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    last = checkpoint.load_latest(out)[0]
    state = last["scheduler"]
    assert state["epoch"] == last["epoch"] >= 1 and len(state["velocity"]) == 17  # epoch ends the update has seen
    assert subprocess.run(cli_args(store, out, **kw), env=cli_env).returncode == 0
    assert_same_run(out, ref)
    lrs = [json.loads(line)["lr"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 3 and lrs[0] == 0.03 and lrs[1] != lrs[0]  # conv1's LR, set by Adas at each epoch's end


def test_adas_scores_layers_with_the_references_evbmf_search():
    """Parity: Adas's learning rates follow the gains the AdaS code computed, so its KG uses the reference's
    bounded search, not distillation's grid default; on the stem's known-rank unfolding the two differ."""
    from histokt.distill.evbmf import layer_metrics
    from tests.distill.test_evbmf import known_rank_matrix

    stem = torch.from_numpy(known_rank_matrix(64, 147, 32, (2, 4), 0.1, 1)).reshape(64, 3, 7, 7)
    reference, grid = layer_metrics(stem, search="reference"), layer_metrics(stem, search="grid")
    assert reference.kg != grid.kg
    kept = lambda m: (m.inp.kg if m.inp.rank else None, m.out.kg if m.out.rank else None)
    assert adas.layer_kg(stem) == kept(reference)


def test_an_unfolding_without_a_value_keeps_its_previous_gain():
    """method.md §4.4: where EVBMF keeps nothing (or fails), the previous epoch's value, per unfolding."""
    w = _p(4, 4, 3, 3)
    gains = iter([(0.2, 0.4), (None, 0.6), (None, None)])
    opt = Adas([w], lr=0.03)
    sched = AdasSchedule(opt, step_size=10, kg=lambda _: next(gains))
    sched.step()  # G = (0.2 + 0.4) / 2 = 0.3; v = 0.03
    sched.step()  # G_in kept: (0.2 + 0.6) / 2 = 0.4; ready: v = 0.98*0.03 + (0.4 - 0.3) = 0.1294
    assert sched.last_kg == pytest.approx([0.4]) and _lrs(opt) == pytest.approx([0.1294])
    state = sched.state_dict()
    resumed = AdasSchedule(Adas([w], lr=0.03), step_size=10, kg=lambda _: (None, None))
    resumed.load_state_dict(state)
    resumed.step()  # both kept: G = 0.4, Delta = 0; v = 0.98*0.1294 = 0.126812 (not the 1e-10 floor of G = 0)
    assert resumed.last_kg == pytest.approx([0.4]) and _lrs(resumed.optimizer) == pytest.approx([0.126812])


def _two_ranks_disagree(rank: int, port: int, queue) -> None:
    """Each rank's own 'BLAS' gives a different gain; rank 0's must set both ranks' learning rates."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        calls: list = []
        own = iter([0.1, 0.1] if rank == 0 else [0.5, 0.9])  # rank 1 alone would move: v = 0.0294 + 0.4
        opt = Adas([_p(4, 4, 3, 3)], lr=0.03)
        sched = AdasSchedule(opt, kg=lambda _: calls.append(rank) or next(own))
        sched.step()
        sched.step()
        queue.put((rank, _lrs(opt), calls))
    finally:
        dist.destroy_process_group()


def test_under_ddp_rank_0_measures_the_gains_and_every_rank_takes_them():
    import multiprocessing as mp

    from histokt.train.distributed import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_two_ranks_disagree, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    seen = {rank: (lrs, calls) for rank, lrs, calls in (queue.get() for _ in procs)}
    # epoch 1: rank 0's G = 0.1 both times, so Delta = 0: v = 0.98 * 0.03 = 0.0294 on both ranks
    assert seen[0][0] == seen[1][0] == pytest.approx([0.0294])
    assert seen[0][1] == [0, 0] and seen[1][1] == []  # rank 1 never ran EVBMF
