"""SIGINT and SIGTERM as one clean exception: the run ends with one line, temporary files are removed by the usual
`finally` clean-up, and the process exits with the conventional code 128 + signal number (130, 143).

`handle_signals()` installs the handlers for the duration of a `with` block (main thread only) and restores the
previous ones afterwards, so calling `generate.main()` from tests leaks nothing. The first signal raises
`Interrupted` (a KeyboardInterrupt, so library code that catches Exception does not swallow it); a second signal
during the clean-up removes the temporary videos and leaves at once.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by the handler of SIGINT / SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalState:
    """What the handlers saw: `signum` of the first signal (None if none arrived)."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None


def _hard_exit(signum: int) -> None:
    from .video import remove_temp_files

    remove_temp_files()
    os.write(2, f"error: interrupted again by {signal.Signals(signum).name} during clean-up; "
                "temporary files removed\n".encode())
    os._exit(128 + signum)


@contextmanager
def handle_signals(signals=SIGNALS):
    """Turn `signals` into `Interrupted` inside the block; yields a SignalState. Outside the main thread (where
    Python cannot install handlers) it installs nothing and yields a state that stays empty."""
    state = SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state.signum is None:
            state.signum = signum
            raise Interrupted(signum)
        _hard_exit(signum)

    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
