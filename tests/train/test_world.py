"""histokt.train.distributed in-process: the world from the environment, joining a group, and the collectives
and CPU SyncBatchNorm over a real gloo group of one process (the two-process agreement is in test_distributed)."""

import os

import pytest
import torch
import torch.distributed as dist

from histokt.train import distributed
from histokt.train.distributed import World

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
CPU = torch.device("cpu")


def unset(monkeypatch, *names: str) -> None:
    """Remove variables for the test only (set first, so that monkeypatch restores their absence too)."""
    for name in names:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)


@pytest.fixture
def plain(monkeypatch):
    unset(monkeypatch, *LAUNCH_VARS)


@pytest.fixture
def alone(tmp_path):
    """A real gloo process group whose only rank is this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        distributed.shutdown()


# ---- the world -----------------------------------------------------------------------------------------------


def test_a_plain_process_is_no_world(plain):
    assert distributed.from_environment() is None
    assert World().main and not World(rank=1, size=2).main


def test_torchrun_without_local_rank(plain, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.from_environment() == World(2, 3, 0)


def test_rank_alone_is_not_a_torchrun_world(plain, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    assert distributed.from_environment() is None
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.from_environment() is None


def test_two_srun_tasks_without_local_id(plain, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert distributed.from_environment() == World(1, 2, 0)
    monkeypatch.delenv("SLURM_PROCID")  # tasks without a task id: no world
    assert distributed.from_environment() is None


def test_an_unparsable_nodelist_falls_back_to_localhost():
    assert distributed.first_host("") == "127.0.0.1"
    assert distributed.first_host("[1-2]") == "127.0.0.1"


def test_free_port_is_bindable():
    import socket

    port = distributed.free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ---- joining a group (init_process_group recorded, not run) -------------------------------------------------


@pytest.fixture
def joins(monkeypatch):
    calls = []

    def init_process_group(backend, *, rank, world_size):
        calls.append((backend, rank, world_size))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    unset(monkeypatch, "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
    return calls


def test_a_world_of_one_joins_nothing(joins):
    distributed.init(World(0, 1, 0), CPU)
    assert joins == [] and "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ


def test_joining_on_one_machine(joins):
    distributed.init(World(1, 2, 1), CPU)
    assert joins == [("gloo", 1, 2)]
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "20000")


def test_srun_tasks_meet_on_the_first_host_at_a_port_from_the_job_id(joins, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-05,7],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    distributed.init(World(3, 4, 1), torch.device("cuda"))
    assert joins == [("nccl", 3, 4)]
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu03", str(20000 + 123456 % 40000))


def test_a_launchers_address_and_port_are_kept(joins, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-05]")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    distributed.init(World(0, 3, 0), CPU)
    assert joins == [("gloo", 0, 3)]
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29500")


# ---- collectives: no-ops alone, real calls in a group of one -------------------------------------------------


def test_without_a_group_every_collective_is_a_no_op():
    assert not distributed.active()
    t = torch.tensor([1.0, 2.0])
    assert distributed.gather_cat(t) is t
    distributed.broadcast_buffers(torch.nn.BatchNorm2d(2))
    distributed.barrier()
    distributed.shutdown()
    assert not distributed.active()


def test_collectives_in_a_group_of_one(alone):
    assert distributed.active()
    assert distributed.any_rank([True, False, True], CPU) == [True, False, True]
    assert distributed.any_rank([False, True], CPU) == [False, True]
    distributed.barrier()
    assert torch.equal(
        distributed.gather_cat(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    )
    bn = torch.nn.BatchNorm2d(2)
    assert bn.running_mean is not None
    bn.running_mean.fill_(0.5)
    distributed.broadcast_buffers(bn)
    assert torch.equal(bn.running_mean, torch.tensor([0.5, 0.5]))
    distributed.shutdown()
    assert not distributed.active() and not dist.is_initialized()


def test_flags_travel_on_the_given_device_whatever_the_default(alone):
    """On GPUs the flags must sit on the rank's device (NCCL refuses others): the device argument is used."""
    with torch.device("meta"):
        assert distributed.any_rank([True, False], CPU) == [True, False]


# ---- BatchNorm over the global batch -------------------------------------------------------------------------


def _pair(momentum=0.3, eps=0.1):
    torch.manual_seed(0)
    plain_bn = torch.nn.BatchNorm2d(3, eps=eps, momentum=momentum)
    with torch.no_grad():
        plain_bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        plain_bn.bias.copy_(torch.tensor([0.1, -0.3, 2.0]))
    sync = distributed.CpuSyncBatchNorm(3, eps=eps, momentum=momentum)
    sync.load_state_dict(plain_bn.state_dict())
    return plain_bn, sync


def test_cpu_sync_batchnorm_alone_is_batchnorm(alone):
    plain_bn, sync = _pair()
    x = torch.randn(4, 3, 5, 6) * 0.2 + 1.0
    for _ in range(2):
        torch.testing.assert_close(sync(x), plain_bn(x))
    for name, want in plain_bn.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[name], want, msg=name)
    assert int(sync.num_batches_tracked) == 2
    plain_bn.eval(), sync.eval()  # evaluation: the running statistics, nothing exchanged
    torch.testing.assert_close(sync(x * 3), plain_bn(x * 3))


def test_cpu_sync_batchnorm_counts_in_the_inputs_precision(alone):
    """2049 values a channel: exact in float32, not in a float16 default dtype (which would count 2048)."""
    plain_bn, sync = _pair()
    x = torch.randn(1, 3, 2049, 1) + 1.0
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        torch.testing.assert_close(sync(x), plain_bn(x))
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(sync.running_var, plain_bn.running_var)


def test_cpu_sync_batchnorm_without_a_group_is_batchnorm():
    plain_bn, sync = _pair()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(sync(x), plain_bn(x))


NEEDS = r"^CpuSyncBatchNorm needs running statistics and a momentum \(not a cumulative average\)$"


def test_cpu_sync_batchnorm_needs_a_momentum_and_running_statistics(alone):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=NEEDS):
        distributed.CpuSyncBatchNorm(3, momentum=None)(x)
    with pytest.raises(ValueError, match=NEEDS):
        distributed.CpuSyncBatchNorm(3, track_running_stats=False)(x)
    for dropped in ("running_mean", "running_var", "num_batches_tracked"):
        bn = distributed.CpuSyncBatchNorm(3)
        setattr(bn, dropped, None)
        with pytest.raises(ValueError, match=NEEDS):
            bn(x)


class OwnNorm(torch.nn.BatchNorm2d):
    """A BatchNorm2d subclass with behaviour of its own: left as it is."""


def test_convert_sync_batchnorm_on_cpu():
    bn = torch.nn.BatchNorm2d(3, eps=0.01, momentum=0.2)
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.fill_(0.25)
    bn.running_var.fill_(4.0)
    with torch.no_grad():
        bn.weight.fill_(1.5)
    inner = torch.nn.BatchNorm2d(3, affine=False)
    inner.eval()
    untracked = torch.nn.BatchNorm2d(3, track_running_stats=False)
    own = OwnNorm(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 1), bn, torch.nn.Sequential(inner, torch.nn.BatchNorm1d(3)), own, untracked
    )
    converted = distributed.convert_sync_batchnorm(model, CPU)
    assert converted is model
    top = list(model.children())
    first, (nested, bn1d), last = top[1], list(top[2].children()), top[4]
    assert type(first) is distributed.CpuSyncBatchNorm and type(nested) is distributed.CpuSyncBatchNorm
    assert (first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats) == (
        3,
        0.01,
        0.2,
        True,
        True,
    )
    assert (nested.affine, nested.training, first.training) == (False, False, True)
    for name, want in bn.state_dict().items():
        assert torch.equal(first.state_dict()[name], want), name
    assert type(last) is distributed.CpuSyncBatchNorm and not last.track_running_stats and last.running_mean is None
    assert type(bn1d) is torch.nn.BatchNorm1d and top[3] is own and type(top[0]) is torch.nn.Conv2d


def test_convert_sync_batchnorm_on_gpu_is_torchs():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    converted = distributed.convert_sync_batchnorm(model, torch.device("cuda"))
    assert [type(m) for m in converted.children()] == [torch.nn.SyncBatchNorm]
