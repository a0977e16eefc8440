"""Every command the README shows is a real command with real options, and a named test runs it."""

import ast
import os
import re
import subprocess

import pytest

from histokt import cli
from tests.conftest import ROOT

README = ROOT / "README.md"
PROGRAMS = ("histokt", "make", "sbatch", "apptainer", "scontrol", "squeue", ".ci/run", "slurm/local/start.sh", "sudo")

# README command (a regex on the command, whitespace collapsed) -> the tests that run it. A command shown in the
# README without an entry here fails test_every_readme_command_is_run_by_a_test.
COVERAGE = [
    (
        r"make demo",
        [
            "test_readme.py::test_make_targets_are_the_readme_commands",
            "batch/test_demo.py::test_demo_runs_the_whole_study_locally",
        ],
    ),
    (r"make (test|bench)", ["test_readme.py::test_make_targets_are_the_readme_commands"]),
    (r"make mutation", ["test_readme.py::test_make_targets_are_the_readme_commands"]),
    (
        r"make image",
        [
            "test_readme.py::test_make_targets_are_the_readme_commands",
            "test_container.py::test_the_image_holds_this_trees_histokt_and_the_hosts_python",
        ],
    ),
    (r"apptainer test histokt\.sif", ["test_container.py::test_apptainer_test_passes"]),
    (r"apptainer sif header", ["test_container.py::test_the_image_holds_this_trees_histokt_and_the_hosts_python"]),
    (r"apptainer run", ["test_container.py::test_apptainer_run_demo_runs_the_study_from_the_images_install"]),
    (
        r"histokt sweep jobs/paper\.toml --executor slurm --rehearse.*",
        ["batch/test_rehearse.py::test_a_rehearsal_runs_every_cell_and_trains_nothing"],
    ),
    (r"\.ci/run", ["test_readme.py::test_ci_runs_the_cluster_script_then_make_test"]),
    (r"(sudo )?slurm/local/start\.sh", ["test_slurm_local.py::test_two_task_array_runs_both_tasks"]),
    (r"histokt demo", ["batch/test_demo.py::test_demo_runs_the_whole_study_locally"]),
    (r"histokt standardize --no-filter", ["ingest/test_parity.py::test_no_filter_on_the_command_line"]),
    (
        r"histokt collect RUN_ROOT --compare-paper",
        ["results/test_collect.py::test_compare_paper_states_each_deviation_first_and_labels_the_matrices"],
    ),
    (
        r"histokt sweep SPEC --dry-run",
        [
            "batch/test_sweep.py::test_dry_run_of_the_paper_spec",
            "study/test_plan.py::test_study_sizes_the_readme_states",
        ],
    ),
    (r"histokt demo --executor slurm", ["batch/test_demo.py::test_demo_on_slurm"]),
    (
        r"histokt demo --raw-root ~/data .*",
        [
            "batch/test_demo.py::test_raw_root_caps_real_data_at_per_class",
            "batch/test_demo.py::test_demo_on_the_shared_real_data",
        ],
    ),
    (
        r"histokt demo --raw-root \.\./shared/data --datasets jobs/demo-shared-data\.toml .*",
        ["batch/test_demo.py::test_demo_on_the_shared_real_data"],
    ),
    (
        r"histokt standardize( --dataset CARD .*)?",
        [
            "ingest/test_standardize.py::test_concurrent_shard_processes",
            "ingest/test_standardize.py::test_strict_makes_a_bad_image_fatal_and_writes_nothing",
        ],
    ),
    (
        r"sbatch --array=0-7 --wrap 'histokt standardize .*",
        ["test_slurm_local.py::test_readme_sbatch_standardize_example"],
    ),
    (r"sbatch", ["test_slurm_local.py::test_readme_sbatch_standardize_example"]),
    (
        r"histokt train( --store data/store\.zarr --dataset crc .*)?",
        ["train/test_loop.py::test_sigkill_and_resume_is_bitwise_identical"],
    ),
    (
        r"histokt train --store data/store\.zarr --dataset bach --out runs/B-.* --norm crc",
        ["train/test_loop.py::test_readme_stage_b_command_line"],
    ),
    (r"histokt train .* --init imagenet --norm imagenet", ["train/test_loop.py::test_imagenet_init_from_staged_file"]),
    (
        r"histokt train .* --init merged\.pt --mode deep",
        ["distill/test_merge.py::test_merged_checkpoint_initializes_training"],
    ),
    (r"histokt distill( --sources .*)?", ["distill/test_merge.py::test_cli_success_prints_one_line"]),
    (r"histokt --help", ["test_cli.py::test_top_level_help_lists_commands"]),
    (
        r"histokt standardize … --repair",
        ["ingest/test_repair.py::test_verify_lists_exactly_the_damaged_shards_and_repair_restores_them"],
    ),
    (r"histokt store upgrade( OLD NEW)?", ["store/test_upgrade.py::test_cli_upgrade_then_verify"]),
    (
        r"histokt verify( STORE( \[?--dataset NAME\]?)?)?",
        ["store/test_verify.py::test_a_sound_store_verifies", "store/test_verify.py::test_dataset_restricts_the_check"],
    ),
    (r"histokt sweep", ["batch/test_sweep.py::test_demo_study_end_to_end_then_nothing_to_do"]),
    (
        r"histokt sweep jobs/paper\.toml --executor slurm --dry-run",
        ["batch/test_sweep.py::test_dry_run_of_the_paper_spec"],
    ),
    (
        r"histokt sweep jobs/paper\.toml --executor slurm( \[--container histokt\.sif\])?",
        [
            "batch/test_sweep_slurm.py::test_demo_study_on_slurm",
            "batch/test_sweep_slurm.py::test_container_wraps_every_task",
        ],
    ),
    (
        r"histokt run-cell RUN_ROOT --stage S --index I",
        [
            "batch/test_sweep_slurm.py::test_demo_study_on_slurm",
            "test_slurm_scripts.py::test_exit_75_without_a_signal_is_requeued",
        ],
    ),
    (r"histokt status( RUN_ROOT)?", ["batch/test_sweep.py::test_failing_cell_does_not_stop_the_rest_and_is_reported"]),
    (
        r"histokt collect( RUN_ROOT \[--compare-paper\])?",
        ["results/test_collect.py::test_plan_without_distillation_and_cli"],
    ),
    (r"scontrol show config", ["batch/test_sweep_slurm.py::test_arrays_are_cut_below_max_array_size"]),
    (r"squeue|scontrol", ["batch/test_sweep_slurm.py::test_demo_study_on_slurm"]),
    # The build from the PyTorch base needs its registry, which these machines cannot reach: the definition is
    # checked offline (lint, shell syntax of every section, the pins, an install of exactly the %files into a
    # fresh venv, %test in that venv), and the same definition is really built on the local base (make image).
    (
        r"apptainer build histokt\.sif containers/histokt\.def",
        [
            "test_container.py::test_the_image_holds_this_trees_histokt_and_the_hosts_python",
            "test_container.py::test_files_alone_make_an_installable_project",
            "test_container.py::test_test_section_passes_in_the_venv",
        ],
    ),
]


def readme_commands(text: str) -> list[str]:
    """Lines of the README's bash/sh blocks (continuations joined, comments dropped) and inline code spans that
    start with a program name, whitespace collapsed."""
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if lang not in ("bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = "" if line.lstrip().startswith("#") else re.sub(r"\s+#\s.*$", "", line)
            if line.strip():
                out.append(" ".join(line.split()))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.split()[0] in PROGRAMS:
            out.append(" ".join(span.split()))
    return out


def histokt_lines(commands):
    """(subcommand, flags) of every histokt invocation, including those inside sbatch --wrap '...'."""
    for command in commands:
        for m in re.finditer(r"(?:^|')histokt ([a-z][a-z-]*)([^']*)", command):
            yield m.group(1), set(re.findall(r"--[a-z][a-z0-9-]*", m.group(2)))


def test_readme_commands_are_found():
    commands = readme_commands(README.read_text())
    assert "make demo" in commands and "make test" in commands
    assert any(c.startswith("sbatch --array=0-7 --wrap 'histokt standardize") for c in commands)
    assert any(
        c.startswith("histokt standardize --dataset CARD --raw DIR") and c.endswith("[--no-progress]") for c in commands
    )  # four lines joined


def test_readme_histokt_commands_use_real_options(capsys):
    helps = {}
    for sub, flags in histokt_lines(readme_commands(README.read_text())):
        if sub not in helps:
            assert sub in cli.COMMANDS, f"README shows 'histokt {sub}', which is no command"
            with pytest.raises(SystemExit):
                cli.main([sub, "--help"])
            helps[sub] = capsys.readouterr().out
        unknown = sorted(f for f in flags if f not in helps[sub] and f != "--help")
        assert not unknown, f"README shows histokt {sub} {unknown}: not in 'histokt {sub} --help'"
    assert len(helps) == len(cli.COMMANDS)  # every command appears in the README


def _test_exists(ref: str) -> bool:
    path, name = ref.split("::")
    tree = ast.parse((ROOT / "tests" / path).read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


def test_every_readme_command_is_run_by_a_test():
    uncovered = [
        c for c in readme_commands(README.read_text()) if not any(re.fullmatch(pattern, c) for pattern, _ in COVERAGE)
    ]
    assert not uncovered, f"README commands that no test is named for: {uncovered}"
    missing = [ref for _, refs in COVERAGE for ref in refs if not _test_exists(ref)]
    assert not missing, f"COVERAGE names tests that do not exist: {missing}"


def test_make_targets_are_the_readme_commands():
    def recipe(target):
        # -n: print what would run; -W the stamp: as if the venv were fresh, so the install steps show too
        # inside `make test` (CI) the outer make's variables would make this one print "Entering directory"
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        r = subprocess.run(
            ["make", "--no-print-directory", "-n", "-W", "setup.cfg", target],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    for target in ("demo", "test", "bench"):
        assert "-m pip install -q -e '.[test]'" in recipe(target)  # each creates the virtualenv it needs
    assert recipe("demo").rstrip().endswith(".venv/bin/histokt demo")
    test = recipe("test")
    assert ".venv/bin/python -m pytest -q -rs --durations=15" in test  # CI shows what time each issue spends
    # lint, format and types run before the suite, so CI fails on them
    lint = [".venv/bin/ruff check histokt tests benchmarks", ".venv/bin/ruff format --check", ".venv/bin/mypy"]
    positions = [test.find(step) for step in lint]
    assert -1 not in positions and max(positions) < test.find("-m pytest"), test
    assert "benchmarks/standardize.py" in recipe("bench") and "benchmarks/reader.py" in recipe("bench")
    assert recipe("image").strip() == "bash containers/build.sh histokt.sif"  # what .ci/run runs
    mutation = recipe("mutation")
    assert ".venv/bin/mutmut run" in mutation and "benchmarks/mutation.py" in mutation


def test_ci_runs_the_cluster_script_then_make_test():
    steps = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert steps == [
        "HISTOKT_SLURM_NODES=2 bash slurm/local/start.sh",
        "HISTOKT_APPTAINER_INSTALLER=../shared/tools/install-apptainer.sh bash containers/install-apptainer.sh",
        "bash containers/build.sh histokt.sif",
        "export HISTOKT_REQUIRE_SLURM=1 HISTOKT_REQUIRE_SLURM_NODES=2 HISTOKT_REQUIRE_APPTAINER=1",
        "make test",
    ]
    assert subprocess.run(["bash", "-n", ROOT / ".ci" / "run"]).returncode == 0
