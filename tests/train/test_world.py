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

    def init_process_group(backend, *, rank, world_size, store=None):
        calls.append((backend, rank, world_size) if store is None else (backend, rank, world_size, store))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    unset(monkeypatch, "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
    return calls


def test_a_world_of_one_joins_nothing(joins, tmp_path):
    distributed.init(World(0, 1, 0), CPU, tmp_path)
    assert joins == [] and "MASTER_ADDR" not in os.environ and "MASTER_PORT" not in os.environ
    assert list(tmp_path.iterdir()) == []


def test_without_a_meeting_place_the_ranks_meet_at_torchruns_default(joins):
    distributed.init(World(1, 2, 1), CPU)
    assert joins == [("gloo", 1, 2)]
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "29500")


def test_a_launchers_address_and_port_are_kept(joins, monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-05]")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    distributed.init(World(0, 3, 0), torch.device("cuda"), tmp_path)
    assert joins == [("nccl", 0, 3)]
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29500")
    assert list(tmp_path.iterdir()) == []  # no rendezvous file: the launcher's address decides


# ---- the rendezvous of srun tasks through the run directory (real TCPStores, ranks as threads) ---------------


def meet(folder, size: int, results: dict, key: str, alive: list) -> list:
    """Every rank of a world of ``size`` calls ``rendezvous`` at once (rank 0 last, so the others wait for its
    file); each records the store's port and a value rank 0 set. The stores are kept in ``alive`` until the
    test ends: rank 0's serves the others."""
    import threading

    def rank(r: int) -> None:
        store = distributed.rendezvous(World(r, size, r), folder, timeout_s=60)
        alive.append(store)
        if r == 0:
            store.set(f"{key}/hello", key)
        results[(key, r)] = (store.port, store.get(f"{key}/hello").decode())

    threads = [threading.Thread(target=rank, args=(r,)) for r in [*range(1, size), 0]]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def in_a_step(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")


def test_ranks_meet_where_rank_0_leaves_its_port_and_the_file_goes(in_a_step, tmp_path):
    stale = tmp_path / ".rendezvous-41.0.1"  # the attempt before the last requeue, killed
    stale.write_text("deadhost 1\n")
    results: dict = {}
    for t in meet(tmp_path, 3, results, "cell", []):
        t.join(timeout=90)
    ports = {results[("cell", r)] for r in range(3)}
    assert len(ports) == 1 and next(iter(ports))[1] == "cell"  # all on rank 0's store, which it opened
    assert list(tmp_path.iterdir()) == []  # the stale file and this attempt's, gone once all joined


def test_two_cells_whose_rank_0_share_a_node_never_share_a_port(in_a_step, tmp_path):
    """Two cells with the same job id modulo anything: each rank 0 takes a port its kernel picks."""
    results: dict = {}
    alive: list = []
    threads = meet(tmp_path / "a", 2, results, "a", alive) + meet(tmp_path / "b", 2, results, "b", alive)
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "b").mkdir(exist_ok=True)
    for t in threads:
        t.join(timeout=90)
    assert results[("a", 0)] == results[("a", 1)] and results[("b", 0)] == results[("b", 1)]
    assert results[("a", 0)][0] != results[("b", 0)][0]


def test_the_attempt_names_the_job_step_and_requeue(in_a_step, monkeypatch):
    assert distributed.attempt() == "41.0.2"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert distributed.attempt() == "41.0.3"


def test_a_rank_waiting_for_a_rank_0_that_never_comes_says_so(in_a_step, tmp_path):
    with pytest.raises(RuntimeError, match=r"rank 0 did not open the rendezvous in 1 s"):
        distributed.rendezvous(World(1, 2, 1), tmp_path, timeout_s=1)


# ---- the GPU of a rank (a faked device count) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_rank", "visible", "index"),
    [(0, 4, 0), (3, 4, 3), (1, 2, 1), (0, 1, 0), (3, 1, 0)],  # one GPU visible: srun bound the task to it
)
def test_a_local_rank_takes_its_gpu(local_rank, visible, index, monkeypatch):
    from histokt.train import launch
    from histokt.train.config import TrainConfig

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    device = launch.device_for(TrainConfig(store="s", dataset="d", out="o"), World(5, 8, local_rank))
    assert device == torch.device("cuda", index) and chosen == [index]


def test_more_ranks_than_gpus_on_a_node_is_refused(monkeypatch):
    from histokt.errors import UserError
    from histokt.train.launch import device_index

    with pytest.raises(UserError, match="local rank 2 but 2 GPUs visible on this node: run one task per GPU"):
        device_index(2, 2)


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
