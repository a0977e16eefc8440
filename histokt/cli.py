"""The `histokt` command: a plain argparse front that dispatches to one dataclass-configured command.

argparse-dataclass has no subcommands (cluster.md §7), so the top level reads the command name and
hands the rest of the line to that command's own parser, built from its config dataclass.
"""

import argparse
import sys
import warnings

from argparse_dataclass import ArgumentParser

from . import __version__
from .errors import UserError


def _standardize(argv):
    from .standardize import StandardizeConfig, standardize

    cfg = _parse(StandardizeConfig, "standardize", argv, "Standardize a raw dataset into the Zarr patch store.")
    s = standardize(cfg)
    where = f"{cfg.store}/{s['dataset']}"
    if s["status"] in ("written", "done"):
        counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items())
        verb = "wrote" if s["status"] == "written" else "already complete:"
        extra = f" ({s['rejected']} sources rejected, listed in the attrs)" if s.get("rejected") else ""
        print(f"{where}: {verb} {counts} patches{extra}")
    elif s["status"] == "partial":
        print(f"{where}: this shard is done; {s['parts_missing']} parts of other shards are still missing")
    else:
        print(f"{where}: this shard is done; another process is finalizing ({s['lock']})")
    return 0


def _demo(argv):
    from .demo import DemoConfig, run_demo

    cfg = _parse(DemoConfig, "demo", argv, "Generate a small SYNTHETIC histology collection and run it through histokt.")
    s = run_demo(cfg)
    counts = ", ".join(f"{k} {v}" for k, v in s["counts"].items())
    print(f"demo: standardized synthetic CRC-like data into {cfg.out}/store.zarr/{s['dataset']} ({counts} patches)")
    return 0


def _train(argv):
    from .train import EXIT_REQUEUE, TrainConfig, train

    cfg = _parse(TrainConfig, "train", argv, "Train one cell: Stage A on a source, or Stage B transfer to a target.")
    result = train(cfg)
    if result.get("status") == "interrupted":
        print(f"{cfg.out}: {result['message']}", file=sys.stderr)
        return EXIT_REQUEUE
    valid, test = result["valid"], result["test"]
    print(f"{cfg.out}: done: test top1 {test['top1']:.4f}, balanced {test['balanced_acc']:.4f} "
          f"(best valid top1 {valid['top1_best']:.4f} at epoch {valid['best_epoch']})")
    return 0


COMMANDS = {
    "train": (_train, "train one cell (source training or transfer), exactly resumable, DDP"),
    "demo": (_demo, "a synthetic end-to-end run on this machine (what `make demo` runs)"),
    "standardize": (_standardize, "raw dataset -> standardized 272x272, 1 µm/px patches in a Zarr store"),
}


def _parse(config_cls, name, argv, description):
    parser = ArgumentParser(
        config_cls,
        prog=f"histokt {name}",
        description=description,
    )
    return parser.parse_args(argv)


def _top_parser():
    lines = "\n".join(f"  {name:<13} {help}" for name, (_, help) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="histokt",
        description="HistoKT cross knowledge transfer between histopathology datasets, as one reliable command.",
        epilog=f"commands:\n{lines}\n\nRun 'histokt COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"histokt {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="the command to run")
    return parser


def _format_warning(message, category, filename, lineno, line=None):
    return f"histokt: warning: {message}\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _format_warning  # a user reads the message, not our source line
    parser = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
    args, rest = parser.parse_known_args(argv[:1])
    run, _ = COMMANDS[args.command]
    try:
        return run(argv[1:])
    except UserError as exc:
        print(f"histokt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"histokt {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
