"""Per-stage sbatch resources: every option passes through to the job script, per-dataset overrides of time
and memory go into arrays of their own, and mistakes name the key."""

import pytest

from histokt.batch.sweep import SweepConfig, resource_groups, slurm_parameters, sweep
from histokt.errors import UserError
from histokt.study import plan
from histokt.study.spec import load

SPEC = """
[study]
name = "t"
store = "{root}/s.zarr"
run_root = "{root}/runs"

[datasets.crc]
card = "crc"
raw = "{root}/raw/crc"

[datasets.mhist]
card = "mhist"
raw = "{root}/raw/mhist"

[stages.pretrain]
datasets = ["crc", "mhist"]
inits = ["random"]
seeds = [0, 1]

[stages.pretrain.resources]
gpus = 1
time_min = 660
time_floor_min = 120
mem_gb = 32
gres = "gpu:a100:1"
constraint = "a100&ib"
partition = "gpu"
extra = ["--exclusive", "--mail-type=END"]
per_dataset.mhist = {{ time_min = 15, mem_gb = 8 }}
max_requeues = 3
"""


def write(tmp_path, text=SPEC):
    path = tmp_path / "t.toml"
    path.write_text(text.format(root=tmp_path))
    return path


def test_every_option_reaches_the_job_script(tmp_path):
    out = sweep(SweepConfig(spec=write(tmp_path), executor="slurm", dry_run=True, only="pretrain", progress=False))
    script = out["scripts"]["pretrain"]
    for line in (
        "#SBATCH --gres=gpu:a100:1",
        "#SBATCH --constraint='a100&ib'",  # quoted by submitit; sbatch strips the quotes
        "#SBATCH --partition=gpu",
        "#SBATCH --time-min=120",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "#SBATCH --time=660",
        "#SBATCH --mem=32768MB",
    ):
        assert line in script.splitlines(), (line, script)
    assert "--gpus-per-node" not in script  # the typed gres replaces the plain count
    assert "export HISTOKT_MAX_REQUEUES=3" in script.splitlines()
    # the batch shell survives a SIGTERM (scancel --batch) until its teardown has requeued the task
    assert "trap 'echo \"histokt: SIGTERM: the cell checkpoints and asks to be requeued\" >&2' TERM" in script


def test_per_dataset_overrides_go_into_arrays_of_their_own(tmp_path):
    spec = load(write(tmp_path))
    cells = plan.expand(spec)["pretrain"]
    groups = resource_groups(spec, "pretrain", cells, list(range(len(cells))))
    assert [(g, [plan.cell_dataset(cells[i]) for i in members]) for g, members in groups] == [
        (None, ["crc", "crc"]),
        ("mhist", ["mhist", "mhist"]),
    ]
    short = slurm_parameters(spec, "pretrain", tmp_path, [], "mhist")
    assert (short["time"], short["mem"]) == (15, "8192MB")
    assert short["gres"] == "gpu:a100:1" and short["additional_parameters"]["time_min"] == 120
    assert slurm_parameters(spec, "pretrain", tmp_path, [], "crc")["time"] == 660


@pytest.mark.parametrize(
    "edit,message",
    [
        (("extra = [", 'extra = ["exclusive", '), r"resources.extra\[0\]: 'exclusive': expected an sbatch option"),
        (("per_dataset.mhist", "per_dataset.bach"), r"resources.per_dataset.bach: unknown dataset 'bach'"),
        (("time_min = 15,", "minutes = 15,"), r"mhist.minutes: unknown key; allowed here: mem_gb, time_min"),
        (("mem_gb = 8 ", "mem_gb = -1 "), r"per_dataset.mhist.mem_gb: -1.0 must be a positive"),
        (("time_floor_min = 120", "time_floor_min = 700"), r"time_floor_min: 700 must be between 1 and time_min"),
        (("max_requeues = 3", "tasks_per_node = -1"), r"pretrain.resources.tasks_per_node: -1 is impossible"),
        (("max_requeues = 3", "tasks_per_node = 2"), r"tasks_per_node: 2 with gpus = 1: a GPU stage runs one task"),
    ],
)
def test_resource_mistakes_name_the_key(tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        load(write(tmp_path, SPEC.replace(*edit)))


def ddp_script(tmp_path, resources: str) -> str:
    text = SPEC.split("[stages.pretrain.resources]")[0] + "[stages.pretrain.resources]\n" + resources
    out = sweep(
        SweepConfig(spec=write(tmp_path, text), executor="slurm", dry_run=True, only="pretrain", progress=False)
    )
    return out["scripts"]["pretrain"]


@pytest.mark.parametrize(
    ("resources", "tasks", "gpus"),
    [
        ("nodes = 2\ntasks_per_node = 2\n", 2, None),  # CPU ranks (gloo): the srun path of GPU cells, here
        ("nodes = 2\ngpus = 4\n", 4, 4),  # one task (rank) per GPU
        ("gpus = 4\ntasks_per_node = 4\n", 4, 4),  # the same, said twice
    ],
)
def test_a_ddp_stage_asks_for_its_ranks_and_ends_its_step_when_one_dies(tmp_path, resources, tasks, gpus):
    lines = ddp_script(tmp_path, resources).splitlines()
    assert f"#SBATCH --ntasks-per-node={tasks}" in lines
    assert ("#SBATCH --gpus-per-node=4" in lines) == (gpus == 4)
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun.split()


@pytest.mark.parametrize("resources", ["", "gpus = 1\n", "tasks_per_node = 1\n"])
def test_a_one_task_stage_runs_as_before(tmp_path, resources):
    lines = ddp_script(tmp_path, resources).splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert "--kill-on-bad-exit=1" not in next(line for line in lines if line.startswith("srun ")).split()


def test_only_one_task_cells_are_pooled():
    from histokt.batch.pool import poolable
    from histokt.study.spec import Resources

    assert poolable(Resources()) and poolable(Resources(gpus=1)) and poolable(Resources(tasks_per_node=1))
    assert not poolable(Resources(tasks_per_node=2)) and not poolable(Resources(nodes=2))


@pytest.mark.parametrize("resources", ["nodes = 2", "gpus = 2", "tasks_per_node = 4"])
@pytest.mark.parametrize("stage", ["standardize", "collect"])
def test_a_stage_that_is_no_training_runs_one_task(tmp_path, stage, resources):
    text = SPEC + f"\n[stages.{stage}.resources]\n{resources}\n"
    with pytest.raises(UserError, match=rf"stages.{stage}.resources: .*only training stages run several ranks"):
        load(write(tmp_path, text))
