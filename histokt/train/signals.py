"""Stop signals: SIGUSR2/SIGTERM ask a training run to checkpoint at the next step and exit 75 (requeue)."""

import os
import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any, Protocol

_Handler = Any  # what signal.signal returns: a callable, an int, signal.Handlers or None


class _Process(Protocol):
    """What ForwardSignals needs of a multiprocessing Process."""

    @property
    def pid(self) -> int | None: ...

    def is_alive(self) -> bool: ...


class StopRequested:
    """SIGUSR2/SIGTERM only set a flag; the loop checks it at the next step boundary (docs/cluster.md §4.2).

    Nested in another StopRequested (a rank of a multi-task job step holds one around the whole cell), it
    starts with the outer one's flag (a signal that came while the data was staged stops the training at its
    first step) and hands its own back on exit, so a signal is never lost between the two, nor fatal."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.flag = False
        self.previous: dict[int, _Handler] = {}

    def __enter__(self) -> "StopRequested":
        return self.install()

    def install(self) -> "StopRequested":
        """The handlers in place (``with`` puts the previous ones back; a process that ends under them need not)."""
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        self.flag = self.flag or any(outer.flag for outer in self._outer())
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.flag = True

    def _outer(self) -> list["StopRequested"]:
        bound = (getattr(handler, "__self__", None) for handler in self.previous.values())
        return [outer for outer in bound if isinstance(outer, StopRequested) and outer is not self]

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        for outer in self._outer():
            outer.flag = outer.flag or self.flag


class ForwardSignals:
    """The --nproc parent passes SIGUSR2/SIGTERM on to its ranks, which checkpoint and exit 75 together.

    A scheduler signals the parent only (the sbatch scripts forward to histokt, not to its children), and
    the parent would die of SIGUSR2's default action. The ranks start with the signals ignored (an ignored
    disposition survives exec) until their own handlers are in place, and the parent sends again every
    second while any rank runs: a signal that arrives during start-up is delayed, never lost or fatal."""

    def __init__(self, procs: Sequence[_Process]) -> None:
        self.procs = procs
        self.pending: set[int] = set()
        self.previous: dict[int, _Handler] = {}

    def __enter__(self) -> "ForwardSignals":
        for sig in StopRequested.SIGNALS:
            self.previous[sig] = signal.signal(sig, signal.SIG_IGN)  # inherited by the ranks started next
        return self

    def arm(self) -> None:
        """After the ranks started: a Python handler would not survive their exec, SIG_IGN does."""
        for sig in StopRequested.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.pending.add(signum)
        self.send()

    def send(self) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                for sig in self.pending:
                    os.kill(p.pid, sig)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
