"""slurm/*.sbatch: the plain sbatch array scripts, checked without SLURM.

Syntax (`bash -n`), the #SBATCH header, and the batch shell's signal logic run for real: a fake `histokt`
that waits for USR2 and exits 75, a fake `scontrol` that records its arguments, and a fake `apptainer`
that drops its options and runs the command, all on PATH; the test plays slurmd by setting the SLURM_*
variables and signalling the batch shell as `--signal=B:USR2@120` would.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
STAGES = ("standardize", "pretrain", "transfer", "collect")
GPU_STAGES = {"pretrain", "transfer"}

FAKE_HISTOKT = r"""#!/bin/bash
# fake histokt: records its argv, then behaves as FAKE_MODE says
printf '%s\n' "$@" > "$FAKE_DIR/args"
on_signal() { echo "$1" >> "$FAKE_DIR/signals"; exit 75; }
trap 'on_signal USR2' USR2
trap 'on_signal TERM' TERM
case "$FAKE_MODE" in
    exit:*) exit "${FAKE_MODE#exit:}" ;;
esac
touch "$FAKE_DIR/ready"
for _ in $(seq 300); do sleep 0.1; done  # 30 s at most, then "finished"
exit 0
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol"
exit "${FAKE_SCONTROL_RC:-0}"
"""

FAKE_APPTAINER = r"""#!/bin/bash
# fake apptainer: records its argv, drops `exec` and the options up to the image, runs the command (exec, so
# signals reach it as apptainer's forwarding would deliver them)
printf '%s\n' "$@" > "$FAKE_DIR/apptainer"
[ "$1" = exec ] || exit 97
shift
while [ $# -gt 0 ]; do
    case "$1" in
        --bind | --env) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
shift  # the image
exec "$@"
"""


def _script(stage):
    return SLURM / f"{stage}.sbatch"


def _sbatch_options(path):
    """The #SBATCH options as sbatch reads them: only before the first command line."""
    opts = []
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            opts.append(line[len("#SBATCH") :].strip())
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return opts


def _body(path, stage):
    """The script from `set -u` on, with its stage name neutralized."""
    text = path.read_text()
    return text[text.index("\nset -u\n") :].replace(f"STAGE={stage}\n", "STAGE=X\n")


@pytest.mark.parametrize("stage", STAGES)
def test_bash_syntax(stage):
    path = _script(stage)
    assert path.read_text().startswith("#!/bin/bash\n")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_header(stage):
    path = _script(stage)
    opts = _sbatch_options(path)
    assert f"--job-name=histokt-{stage}" in opts
    assert "--requeue" in opts
    assert "--signal=B:USR2@120" in opts, "the batch shell must get USR2: it forwards it and requeues"
    assert "--open-mode=append" in opts, "a requeued task must not truncate its log"
    assert any(o.startswith("--output=") and "%A" in o and "%a" in o for o in opts)
    assert ("--gres=gpu:1" in opts) == (stage in GPU_STAGES)
    assert any(o.startswith("--mem=") for o in opts), "memory is asked for, never the site's default"
    # every #SBATCH line is in the header (sbatch ignores those after the first command)
    all_lines = [ln for ln in path.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert len(all_lines) == len(opts)
    text = path.read_text()
    assert f"STAGE={stage}\n" in text
    assert 'run-cell "$RUN_ROOT" --stage "$STAGE" --index "$INDEX"' in text
    assert "INDEX=$((OFFSET + SLURM_ARRAY_TASK_ID))" in text
    assert 'scontrol requeue "$REQUEUE_ID"' in text
    assert 'REQUEUE_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in text


def test_stage_scripts_share_one_body():
    """The four scripts differ only in their header and STAGE: a fix to one must reach all."""
    bodies = {stage: _body(_script(stage), stage) for stage in STAGES}
    reference = bodies["pretrain"]
    for stage, body in bodies.items():
        assert body == reference, f"slurm/{stage}.sbatch's body drifted from slurm/pretrain.sbatch's"


@pytest.mark.parametrize("stage", STAGES)
def test_requeue_code_is_histokts(stage):
    """The scripts are shell, so they hold their own copy of histokt.errors.EXIT_REQUEUE: one assignment, equal
    to Python's, and every other code line uses the variable (a bare number would drift unseen)."""
    from histokt.errors import EXIT_REQUEUE

    lines = _script(stage).read_text().splitlines()
    assignments = [m.group(1) for ln in lines if (m := re.match(r"EXIT_REQUEUE=(\S+)", ln.strip()))]
    assert assignments == [str(EXIT_REQUEUE)], (
        f"slurm/{stage}.sbatch sets EXIT_REQUEUE={assignments}; histokt/errors.py says {EXIT_REQUEUE}"
    )
    code = [ln for ln in lines if not ln.lstrip().startswith("#") and not ln.strip().startswith("EXIT_REQUEUE=")]
    bare = [ln for ln in code if re.search(rf"\b{EXIT_REQUEUE}\b", ln)]
    assert not bare, f"slurm/{stage}.sbatch spells the requeue code as a number: {bare}"
    assert any('"$EXIT_REQUEUE"' in ln for ln in code)


def test_readme_names_every_script():
    readme = (SLURM / "README.md").read_text()
    for stage in STAGES:
        assert f"{stage}.sbatch" in readme


class Batch:
    """One batch-script run with fake histokt/scontrol/apptainer on PATH."""

    def __init__(self, tmp_path, stage="pretrain", mode="usr2", task=7, offset="1000", array=True, **env):
        self.dir = tmp_path / "fake"
        bin_dir = tmp_path / "bin"
        self.dir.mkdir()
        bin_dir.mkdir()
        for name, text in (("histokt", FAKE_HISTOKT), ("scontrol", FAKE_SCONTROL), ("apptainer", FAKE_APPTAINER)):
            exe = bin_dir / name
            exe.write_text(text)
            exe.chmod(0o755)
        self.run_root = tmp_path / "sweep"
        self.run_root.mkdir()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
        full_env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_DIR=str(self.dir),
            FAKE_MODE=mode,
            RUN_ROOT=str(self.run_root),
            SLURM_JOB_ID="4250",
        )
        if offset is not None:
            full_env["OFFSET"] = offset
        if task is not None:
            full_env["SLURM_ARRAY_TASK_ID"] = str(task)
        if array:
            full_env["SLURM_ARRAY_JOB_ID"] = "4242"
        full_env.update(env)
        self.proc = subprocess.Popen(
            ["bash", str(_script(stage))],
            env=full_env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while not (self.dir / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out = self.proc.communicate()[0]
                pytest.fail(f"the fake histokt never started waiting (rc {self.proc.returncode}):\n{out}")
            time.sleep(0.02)

    def finish(self, timeout=20):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out = self.proc.communicate()[0]
            pytest.fail(f"the batch script did not finish:\n{out}")
        return self.proc.returncode, out

    def read(self, name):
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else None


@pytest.mark.parametrize("stage", STAGES)
def test_usr2_is_forwarded_and_the_task_requeued_from_the_batch_shell(tmp_path, stage):
    batch = Batch(tmp_path, stage=stage)
    batch.wait_ready()
    batch.proc.send_signal(signal.SIGUSR2)  # what --signal=B:USR2@120 does: the batch shell only
    rc, out = batch.finish()
    assert rc == 0, out
    assert batch.read("args") == ["run-cell", str(batch.run_root), "--stage", stage, "--index", "1007"]
    assert batch.read("signals") == ["USR2"], out
    assert batch.read("scontrol") == ["requeue 4242_7"], out  # this task only, never the whole array
    assert "requeueing 4242_7" in out


def test_sigterm_is_forwarded_too(tmp_path):
    """scancel, the time limit and preemption without preempt_send_user_signal send SIGTERM."""
    batch = Batch(tmp_path)
    batch.wait_ready()
    batch.proc.send_signal(signal.SIGTERM)
    rc, out = batch.finish()
    assert rc == 0, out
    assert batch.read("signals") == ["TERM"], out
    assert batch.read("scontrol") == ["requeue 4242_7"]


def test_exit_75_without_a_signal_is_requeued(tmp_path):
    batch = Batch(tmp_path, mode="exit:75", task=0, offset=None)
    rc, out = batch.finish()
    assert rc == 0, out
    assert batch.read("args")[-1] == "0"  # OFFSET defaults to 0
    assert batch.read("scontrol") == ["requeue 4242_0"]


@pytest.mark.parametrize("code", [0, 1, 2])
def test_other_exit_codes_pass_through_without_requeue(tmp_path, code):
    batch = Batch(tmp_path, mode=f"exit:{code}")
    rc, out = batch.finish()
    assert rc == code, out
    assert batch.read("scontrol") is None


def test_plain_job_requeues_its_job_id(tmp_path):
    batch = Batch(tmp_path, mode="exit:75", task=None, offset="12", array=False)
    rc, out = batch.finish()
    assert rc == 0, out
    assert batch.read("args")[-1] == "12"
    assert batch.read("scontrol") == ["requeue 4250"]


def test_max_requeues_stops_the_loop(tmp_path):
    batch = Batch(tmp_path, mode="exit:75", MAX_REQUEUES="3", SLURM_RESTART_COUNT="3")
    rc, out = batch.finish()
    assert rc == 75, out
    assert batch.read("scontrol") is None
    assert "MAX_REQUEUES=3" in out


def test_failed_scontrol_keeps_exit_75(tmp_path):
    batch = Batch(tmp_path, mode="exit:75", FAKE_SCONTROL_RC="1")
    rc, out = batch.finish()
    assert rc == 75, out
    assert batch.read("scontrol") == ["requeue 4242_7"]
    assert "resubmit" in out


def test_container_wraps_histokt_and_requeues_on_the_host(tmp_path):
    image = tmp_path / "histokt.sif"
    image.write_text("")
    batch = Batch(tmp_path, CONTAINER=str(image), CONTAINER_BIND="/data,/scratch/stores")
    batch.wait_ready()
    batch.proc.send_signal(signal.SIGUSR2)
    rc, out = batch.finish()
    assert rc == 0, out
    assert batch.read("apptainer") == [
        "exec",
        "--nv",
        "--bind",
        f"{batch.run_root},/data,/scratch/stores",
        "--env",
        "PYTHONPATH=",
        str(image),
        "histokt",
        "run-cell",
        str(batch.run_root),
        "--stage",
        "pretrain",
        "--index",
        "1007",
    ]
    assert batch.read("signals") == ["USR2"]
    assert batch.read("scontrol") == ["requeue 4242_7"]


def test_relative_run_root_is_made_absolute(tmp_path):
    batch = Batch(tmp_path, mode="exit:0", RUN_ROOT="sweep")  # cwd is tmp_path, as sbatch's is the submit dir
    rc, out = batch.finish()
    assert rc == 0, out
    assert batch.read("args")[1] == str(tmp_path / "sweep")


@pytest.mark.parametrize("env", [{"RUN_ROOT": ""}, {"OFFSET": "-3"}, {"OFFSET": "x"}])
def test_bad_settings_are_user_errors(tmp_path, env):
    batch = Batch(tmp_path, mode="exit:0", **env)
    rc, out = batch.finish()
    assert rc == 2, out
    assert batch.read("args") is None
    assert re.search(r"RUN_ROOT|OFFSET", out)
