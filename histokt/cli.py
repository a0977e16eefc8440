"""The `histokt` command: a plain argparse front that dispatches to one dataclass-configured command.

argparse-dataclass has no subcommands (docs/cluster.md §7), so the top level reads the command name and
hands the rest of the line to that command's own parser, built from its config dataclass.
"""

import argparse
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from argparse_dataclass import ArgumentParser

from histokt import __version__
from histokt.errors import EXIT_BUSY, EXIT_REQUEUE, UserError, full_disk


def _standardize(argv):
    from histokt.ingest.standardize import StandardizeConfig, standardize

    cfg = _parse(StandardizeConfig, "standardize", argv, "Standardize a raw dataset into the Zarr patch store.")
    s = standardize(cfg)
    where = f"{cfg.store}/{s.dataset}"
    if s.status in ("written", "done"):
        counts = ", ".join(f"{k} {v}" for k, v in (s.counts or {}).items())
        verb = "wrote" if s.status == "written" else "already complete:"
        extra = f" ({s.rejected} sources rejected, listed in the attrs)" if s.rejected else ""
        print(f"{where}: {verb} {counts} patches{extra}")
    elif s.status == "repaired":
        if s.repaired:
            files = ", ".join(s.repaired)
            print(f"{where}: re-created {len(s.repaired)} damaged shard files from the raw data: {files}")
        else:
            print(f"{where}: no damaged shard file found; nothing to repair")
    elif s.status == "partial":
        others = "other shards or processes" if s.parts_held else "other shards"
        print(f"{where}: this shard is done; {s.parts_missing} parts of {others} are still missing")
    elif s.status == "finalizing elsewhere":
        print(f"{where}: this shard is done; another process is finalizing ({s.lock})")
    if s.parts_held:
        # a second run of the same command (an array resubmitted, a rerun by hand): the parts another live
        # process is writing are skipped, not waited for; that process finishes them and, last, publishes
        holders = s.held_by or ["another process"]
        by = holders[0] + (f" and {len(holders) - 1} more" if len(holders) > 1 else "")
        then = (
            "nothing else was left to do here: run the same command again after it ends if the dataset is still missing"
            if s.status == "busy"
            else "it finishes them, and the last process to finish publishes the dataset"
        )
        print(
            f"histokt standardize: {where}: {s.parts_held} parts are being written by {by}; {then}",
            file=sys.stderr,
        )
    return EXIT_BUSY if s.status == "busy" else 0


def _demo(argv):
    from histokt.batch.demo import DemoConfig, run_demo

    cfg = _parse(
        DemoConfig,
        "demo",
        argv,
        "Generate a small SYNTHETIC histology collection and run a whole study on it (jobs/demo.toml); "
        "with --raw-root, run the same study on real data.",
    )
    out = run_demo(cfg)
    summary = Path(out["summary"])
    print(f"demo: finished in {out['seconds'] / 60:.1f} min ({out['run_root']})")
    print(f"  transfer matrices: {summary}/matrix_<init>_<mode>.md, .csv, .tex and .png heatmaps")
    print(f"  weight distillation: {summary}/distill.md; what ran: {summary}/report.md")
    return 0 if out.get("not_done", 0) == 0 else 1


def _train(argv):
    from histokt.train.distributed import from_environment
    from histokt.train.launch import TrainConfig, train

    cfg = _parse(TrainConfig, "train", argv, "Train one cell: Stage A on a source, or Stage B transfer to a target.")
    outcome = train(cfg)
    world = from_environment()  # srun, torchrun: every rank gets here; one of them speaks
    quiet = world is not None and not world.main
    if outcome.result is None:  # interrupted: checkpointed on a signal
        if not quiet:
            print(f"{cfg.out}: {outcome.message}", file=sys.stderr)
        return EXIT_REQUEUE
    if quiet:
        return 0
    valid, test = outcome.result.valid, outcome.result.test
    print(
        f"{cfg.out}: done: test top1 {test['top1']:.4f}, balanced {test['balanced_acc']:.4f} "
        f"(best valid top1 {valid.top1_best:.4f} at epoch {valid.best_epoch})"
    )
    return 0


def _distill(argv):
    from histokt.distill.merge import DistillConfig, distill

    cfg = _parse(DistillConfig, "distill", argv, "Merge Stage-A models of one architecture into one, without training.")
    s = distill(cfg)
    picks = "; picks " + ", ".join(f"{run} {n}" for run, n in s["picks"].items()) if s["picks"] else ""
    low = ", lowrank" if s["lowrank"] else ""
    print(
        f"{s['out']}: merged {s['sources']} {s['arch']} models ({s['rule']}{low}) over {s['layers']} conv layers"
        f"{picks}; per-layer report in {s['json']}"
    )
    return 0


def _sweep(argv):
    from histokt.batch.sweep import SweepConfig, sweep

    cfg = _parse(SweepConfig, "sweep", argv, "Plan a study from a spec and run or submit the cells that are not done.")
    if cfg.watch and cfg.executor == "slurm" and not cfg.dry_run:
        from histokt.batch.sweep import watch

        out = watch(cfg, report=lambda line: print(line, flush=True))
        print(f"{out['run_root']}: every cell is done, failed or blocked; see histokt status {out['run_root']}")
        return 0
    out = sweep(cfg)
    for line in out.get("warnings", []):
        print(f"histokt sweep: warning: {line}", file=sys.stderr)
    for stage, c in out["stages"].items():
        print(f"{stage:<12} {c['todo']:>6} to run of {c['total']:>6} cells")
    if cfg.dry_run:
        for stage, script in out["scripts"].items():
            print(f"\n# ---- sbatch script of stage {stage} (first array) ----\n{script}")
        print(f"\n# ---- what it will cost ----\n{out['cost']}")
        print(f"\n# ---- or as pools of {out['pool_workers']} workers each (--pool {out['pool_workers']}) ----")
        print("\n".join(out["pools"]) or "nothing to pool")
        for name, script in out["pool_scripts"].items():
            print(f"\n# ---- sbatch script of pool {name} ----\n{script}")
        print("dry run: nothing submitted")
    elif out.get("status") == "nothing to do":
        print(f"{out['run_root']}: nothing to do: every cell is done or still queued")
    elif cfg.executor == "slurm":
        for stage, job, n in out["arrays"]:
            print(f"submitted {stage}: job {job} ({n} cells)")
        if out.get("blocked"):
            print(f"{out['blocked']} cells not submitted: a cell they read from failed (histokt status names it)")
        if out.get("left"):
            print(
                f"{out['left']} cells wait for a later wave (at most {out['max_queued']} of this study's tasks queued "
                f"at once): run the same command again as the queue drains, or add --watch to stay and do it"
            )
        print(f"follow it with: histokt status {out['run_root']}")
    elif cfg.rehearse:
        print(f"{out['run_root']}: rehearsal {out['status']}; see histokt status {out['run_root']}")
    else:
        print(f"{out['run_root']}: {out['status']}; summary in {out['run_root']}/summary/")
    return 0 if out.get("not_done", 0) == 0 else 1


def _run_cell(argv):
    from histokt.batch.cellrun import run_cell

    cfg = _parse(RunCellConfig, "run-cell", argv, "Run one cell of a planned study (what each array task does).")
    return run_cell(cfg.run_root, cfg.stage, cfg.index)


def _status(argv):
    from histokt.batch.status import render, status

    cfg = _parse(StatusConfig, "status", argv, "Counts per stage and the failed cells of a study.")
    print(render(status(cfg.run_root)))
    return 0


def _collect(argv):
    from histokt.results.collect import collect

    cfg = _parse(CollectConfig, "collect", argv, "Summary tables of a study from its cells' result.json files.")
    out = collect(cfg.run_root, cfg.out, compare_paper=cfg.compare_paper)
    if out["deviations"]:
        print(out["deviations"])
    matrices = ", ".join(out["matrices"]) or "no matrix"
    print(
        f"{out['out']}: {out['rows']} rows, {matrices}; {out['done']} cells done, {out['failed']} failed, "
        f"{out['running']} running, {out['missing']} not started, {out['corrupt']} corrupt "
        f"(report.md; {out['seconds']:.2f} s)"
    )
    return 0


def _verify(argv):
    from histokt.store.verify import verify_store

    cfg = _parse(
        VerifyConfig,
        "verify",
        argv,
        "Check every shard of a patch store against its checksums and its metadata; exit 1 listing each "
        "damaged shard and the repair command.",
    )
    report = verify_store(cfg.store, cfg.dataset, workers=cfg.workers, progress=cfg.progress)
    for line in report.lines():
        print(line)
    return 0 if report.sound else 1


def _store(argv):
    parser = _store_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.parse_args(argv or ["--help"])
    args, _ = parser.parse_known_args(argv[:1])
    run, _ = STORE_COMMANDS[args.subcommand]
    return run(argv[1:])


def _store_upgrade(argv):
    from histokt.store.upgrade import upgrade

    cfg = _parse(
        UpgradeConfig,
        "store upgrade",
        argv,
        "Convert the datasets of a format-1 patch store (one file per padded patch) into format 2 in another "
        "store, exactly (the same patches read back), without the raw data; rerun it to resume.",
    )
    for d in upgrade(cfg.old, cfg.new, progress=cfg.progress):
        counts = ", ".join(f"{k} {v}" for k, v in d.counts.items())
        what = {"upgraded": "upgraded", "skipped": "already upgraded:", "copied": "already format 2, copied:"}
        h, w = d.content_size
        print(f"{cfg.new}/{d.name}: {what[d.status]} {counts} patches ({h}x{w} px content of {d.patch_size} px)")
    print(f"{cfg.new}: check it with 'histokt verify {cfg.new}'")
    return 0


@dataclass
class VerifyConfig:
    store: Path = field(metadata={"args": ["store"], "help": "the patch store"})
    dataset: Optional[str] = field(default=None, metadata={"help": "check this dataset only (default: all)"})
    workers: int = field(
        default=1,
        metadata={"help": "threads reading shards at once (default 1; more help where reads wait on the disk)"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress to hide)"})


@dataclass
class UpgradeConfig:
    old: Path = field(metadata={"args": ["old"], "help": "the format-1 store (read only)"})
    new: Path = field(
        metadata={"args": ["new"], "help": "the format-2 store to write: a new folder, or an existing format-2 store"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress to hide)"})


@dataclass
class RunCellConfig:
    run_root: Path = field(metadata={"args": ["run_root"], "help": "the study's run root"})
    stage: str = field(metadata={"help": "stage of the cell"})
    index: int = field(metadata={"help": "index of the cell in its stage (the array task id plus offset)"})


@dataclass
class StatusConfig:
    run_root: Path = field(metadata={"args": ["run_root"], "help": "the study's run root"})


@dataclass
class CollectConfig:
    run_root: Path = field(metadata={"args": ["run_root"], "help": "the study's run root"})
    out: Optional[Path] = field(default=None, metadata={"help": "output folder (default RUN_ROOT/summary)"})
    compare_paper: bool = field(
        default=False,
        metadata={
            "help": "print and write deviations.md/.csv (every way the study differs from the paper, and why what "
            "stays cannot go), then compare_<init>_deep.csv/.md: our deep matrices minus the published HistoKT "
            "ones, each labelled 'like for like' or 'differs in: ...'"
        },
    )


COMMANDS = {
    "standardize": (_standardize, "raw dataset -> standardized 272x272, 1 µm/px patches in a Zarr store"),
    "train": (_train, "train one cell (source training or transfer), exactly resumable, DDP"),
    "distill": (_distill, "merge Stage-A models into one by knowledge gain or averaging, no training"),
    "sweep": (_sweep, "plan a study (jobs/*.toml) and run it here or submit it to SLURM"),
    "run-cell": (_run_cell, "run one cell of a planned study (used by the array jobs)"),
    "status": (_status, "where a study stands: counts per stage, failed cells"),
    "collect": (_collect, "summary tables of a study, offline"),
    "demo": (_demo, "a whole study on a synthetic collection (or real data: --raw-root), here or on SLURM"),
    "verify": (_verify, "check every shard of a patch store against its checksums; list the damage"),
    "store": (_store, "patch store maintenance: 'histokt store upgrade OLD NEW' converts format 1 to 2"),
}

STORE_COMMANDS = {
    "upgrade": (_store_upgrade, "convert a format-1 store into format 2 (exact, resumable, no raw data)"),
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


def _store_parser():
    lines = "\n".join(f"  {name:<13} {help}" for name, (_, help) in STORE_COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="histokt store",
        description="Maintenance of a patch store.",
        epilog=f"subcommands:\n{lines}\n\nRun 'histokt store SUBCOMMAND --help' for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("subcommand", choices=sorted(STORE_COMMANDS), metavar="SUBCOMMAND", help="what to do")
    return parser


def _format_warning(message, category, filename, lineno, line=None):
    return f"histokt: warning: {message}\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _format_warning  # a user reads the message, not our source line
    parser = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
    args, _ = parser.parse_known_args(argv[:1])
    run, _ = COMMANDS[args.command]
    try:
        return run(argv[1:])
    except UserError as exc:
        print(f"histokt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk or an exceeded quota is the user's to fix, then resume
        error = full_disk(exc)
        if error is None:
            raise
        print(f"histokt {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"histokt {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
