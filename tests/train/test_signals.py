"""Stop signals (histokt.train.signals): StopRequested only sets a flag, ForwardSignals passes SIGUSR2/SIGTERM on
to the live ranks of a --nproc parent; both put the previous handlers back."""

import signal
from types import SimpleNamespace

from histokt.train import signals
from histokt.train.signals import ForwardSignals, StopRequested


def _handlers():
    return {sig: signal.getsignal(sig) for sig in StopRequested.SIGNALS}


def test_stop_requested_installs_its_handler_and_starts_as_a_real_bool():
    before = _handlers()
    with StopRequested() as stop:
        assert stop.flag is False  # distributed.any_rank takes float(flag): None would not do
        assert _handlers() == {sig: stop._handle for sig in StopRequested.SIGNALS}
        signal.raise_signal(signal.SIGTERM)
        assert stop.flag is True
    assert _handlers() == before


def test_a_nested_stop_starts_with_the_outer_ones_signal_and_hands_its_own_back():
    """A rank of a multi-task step holds one StopRequested around the cell; the training loop's nests inside."""
    before = _handlers()
    with StopRequested() as outer:
        signal.raise_signal(signal.SIGTERM)  # while the data was staged: not fatal, not lost
        with StopRequested() as loop:
            assert loop.flag is True
        assert _handlers() == {sig: outer._handle for sig in StopRequested.SIGNALS}
    with StopRequested() as outer:
        with StopRequested() as loop:
            assert loop.flag is False
            signal.raise_signal(signal.SIGUSR2)
        assert outer.flag is True  # the loop's stop, kept for the rest of the cell
        signal.raise_signal(signal.SIGTERM)  # srun ending the step while rank 0 writes its marker: not fatal
    assert _handlers() == before


def test_installed_for_good_it_outlives_no_block():
    before = _handlers()
    try:
        stop = StopRequested().install()
        assert _handlers() == {sig: stop._handle for sig in StopRequested.SIGNALS}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_forward_signals_ignores_during_start_up_then_forwards_to_live_ranks(monkeypatch):
    sent = []
    monkeypatch.setattr(signals.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    ranks = [
        SimpleNamespace(pid=101, is_alive=lambda: True),
        SimpleNamespace(pid=102, is_alive=lambda: False),  # exited already
        SimpleNamespace(pid=None, is_alive=lambda: True),  # not started yet
        SimpleNamespace(pid=104, is_alive=lambda: True),
    ]
    before = _handlers()
    with ForwardSignals(ranks) as fwd:
        assert fwd.procs is ranks and fwd.pending == set()
        assert _handlers() == {sig: signal.SIG_IGN for sig in StopRequested.SIGNALS}  # inherited by the ranks
        signal.raise_signal(signal.SIGUSR2)  # during start-up: ignored, not fatal
        fwd.send()
        assert sent == []
        fwd.arm()
        assert _handlers() == {sig: fwd._handle for sig in StopRequested.SIGNALS}
        signal.raise_signal(signal.SIGUSR2)
        assert fwd.pending == {signal.SIGUSR2}
        assert sent == [(101, signal.SIGUSR2), (104, signal.SIGUSR2)]
        sent.clear()
        fwd.send()  # the parent's once-a-second resend while ranks run
        assert sent == [(101, signal.SIGUSR2), (104, signal.SIGUSR2)]
    assert _handlers() == before
    assert dict(fwd.previous) == before
