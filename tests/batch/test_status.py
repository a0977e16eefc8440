"""`histokt status`: the rendered table, line by line (the columns and the cell_status branches are tested in
tests/batch/test_queue.py)."""

from histokt.batch import status

HEADER = "stage             done   running   pending  requeued    failed   blocked      lost     total"


def report(stages, *, failures=(), scheduler=True, preempted=(0, 0)):
    cells, times = preempted
    return {
        "stages": stages,
        "failures": list(failures),
        "scheduler": scheduler,
        "preempted": {"cells": cells, "times": times},
    }


def test_render_prints_every_stage_the_progress_bar_the_preemptions_and_the_failures():
    stages = {
        "standardize": {"done": 3, "running": 1, "pending": 0, "requeued": 1, "failed": 1, "blocked": 0, "lost": 0},
        "pretrain": {"done": 0, "running": 0, "pending": 2, "requeued": 0, "failed": 0, "blocked": 1, "lost": 1},
    }
    failures = [
        ("standardize", "c1", "input missing: a", "failed"),
        ("pretrain", "p1", "blocked by standardize/c1", "blocked"),
        ("pretrain", "p2", "job 7_1 ended without a word; log: L", "lost"),
    ]
    text = status.render(report(stages, failures=failures, preempted=(2, 5)))
    assert text.split("\n") == [
        HEADER,
        "standardize          3         1         0         1         1         0         0         6",
        "pretrain             0         0         2         0         0         1         1         4",
        "[" + "#" * 12 + "." * 28 + "] 3/10 cells done",  # 3/10 of 40 columns
        "preempted 5 time(s), 2 cell(s); each resumed from its checkpoint",
        "failed standardize/c1: input missing: a",
        "blocked pretrain/p1: blocked by standardize/c1",
        "lost pretrain/p2: job 7_1 ended without a word; log: L",
    ]


def test_render_rounds_the_bar_and_sums_done_over_the_stages():
    stages = {
        "a": {"done": 1, "running": 0, "pending": 0, "requeued": 0, "failed": 0, "blocked": 0, "lost": 0},
        "b": {"done": 1, "running": 0, "pending": 1, "requeued": 0, "failed": 0, "blocked": 0, "lost": 0},
    }
    lines = status.render(report(stages)).split("\n")
    assert lines[-1] == "[" + "#" * 27 + "." * 13 + "] 2/3 cells done"  # round(40 * 2 / 3) = 27
    assert len(lines) == 4  # scheduler present, no preemption, no failure: nothing more


def test_render_without_a_scheduler_and_without_cells():
    text = status.render(report({}, scheduler=False))
    assert text.split("\n") == [
        HEADER,
        "[" + "#" * 40 + "] 0/0 cells done",  # nothing to do is all done
        "(squeue not available: running/pending come from the cells' own state files)",
    ]


def test_render_says_nothing_of_preemption_when_no_cell_was_preempted():
    stages = {"s": {"done": 1, "running": 0, "pending": 0, "requeued": 0, "failed": 0, "blocked": 0, "lost": 0}}
    assert status.render(report(stages)).split("\n") == [
        HEADER,
        "s                    1         0         0         0         0         0         0         1",
        "[" + "#" * 40 + "] 1/1 cells done",
    ]
