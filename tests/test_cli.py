"""The `histokt` command line: help for every command, one-line errors with exit code 2."""

import subprocess

import pytest

from histokt.cli import COMMANDS, main
from tests.conftest import histokt_cmd


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"histokt {command}" in capsys.readouterr().out


def run(*args, env):
    return subprocess.run(histokt_cmd(*args), capture_output=True, text=True, env=env)


def test_unknown_command_exits_2(cli_env):
    r = run("frobnicate", env=cli_env)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_user_errors_are_one_line_exit_2(tmp_path, cli_env):
    cases = [
        (["--dataset", "nope", "--raw", tmp_path, "--store", tmp_path / "s.zarr"], "invalid choice: 'nope'"),
        (["--dataset", "mhist", "--raw", tmp_path / "absent", "--store", tmp_path / "s.zarr"], "no such folder"),
        (["--dataset", "folder", "--raw", tmp_path, "--store", tmp_path / "s.zarr"], "pass --mpp"),
        (["--dataset", "folder", "--raw", tmp_path, "--store", tmp_path / "s.zarr", "--mpp", "nan"], "--mpp nan"),
        (["--dataset", "mhist", "--raw", tmp_path, "--store", tmp_path / "s.zarr"], "verify the download"),
    ]
    for args, message in cases:
        r = run("standardize", *args, env=cli_env)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        lines = [line for line in r.stderr.splitlines() if line.startswith("histokt")]
        assert len(lines) == 1, r.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_store_help_lists_its_subcommands(capsys):
    from histokt.cli import STORE_COMMANDS

    for argv in (["store"], ["store", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: histokt store" in out and "upgrade" in out
    with pytest.raises(SystemExit) as exc:
        main(["store", "upgrade", "--help"])
    assert exc.value.code == 0
    assert "histokt store upgrade" in capsys.readouterr().out and list(STORE_COMMANDS) == ["upgrade"]


def test_verify_and_store_upgrade_errors_are_one_line_exit_2(tmp_path, cli_env):
    from tests.fixtures.format1 import labels_of, pcam_like, write_v1_dataset

    old = tmp_path / "old.zarr"
    write_v1_dataset(old, "pcam", {"train": (pcam_like(2, content=5, patch_size=12), labels_of(2))})
    cases = [
        (("verify", old), "histokt verify: error: ", f"'histokt store upgrade {old} NEW_STORE'"),
        (("verify", tmp_path), "histokt verify: error: ", "not a histokt store"),
        (("store", "upgrade", old, old), "histokt store: error: ", "NEW is the store OLD itself"),
        (("store", "frobnicate"), "usage: histokt store", "invalid choice: 'frobnicate'"),
    ]
    for args, start, message in cases:
        r = run(*args, env=cli_env)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert start in r.stderr
    r = run("store", "upgrade", old, tmp_path / "new.zarr", "--no-progress", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "(5x5 px content of 12 px)" in r.stdout
    r = run("verify", tmp_path / "new.zarr", env=cli_env)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(": sound") and not r.stderr, r.stderr
