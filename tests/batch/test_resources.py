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
    ],
)
def test_resource_mistakes_name_the_key(tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        load(write(tmp_path, SPEC.replace(*edit)))
