"""Stopping on a signal: Ctrl-C (SIGINT) or SIGTERM during training stops the loop between two steps, after a
checkpoint (StopOnInterrupt, TrainingInterrupted); outside training, SIGTERM ends a command-line program the
way Ctrl-C does, in one line (terminate_like_ctrl_c, Terminated).
"""
import contextlib
import signal
import threading

from .distributed import SINGLE_PROCESS

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (what `kill`, batch schedulers and container runtimes send) during
    training sets a flag that the loop checks between steps, so the checkpoint it then writes never holds
    a half-applied optimiser step. `signal_number`: the signal that came (SIGTERM if both did)."""

    def __enter__(self):
        self.signal_number = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._request) for number in STOP_SIGNALS}
        return self

    @property
    def requested(self):
        return self.signal_number is not None

    def _request(self, signum, frame):
        self.signal_number = max(signum, self.signal_number or 0)

    def agreed_signal(self, communicator=SINGLE_PROCESS):
        """The signal every rank stops for (collective under MPI; called once the ranks agree to stop): SIGTERM
        if any rank got it, so that every rank exits with the same status."""
        return max(communicator.allgather(self.signal_number or 0)) or signal.SIGINT

    def __exit__(self, *exc_info):
        for number, previous in self.previous.items():
            if previous is not None:           # None: a handler not installed from Python, which cannot be restored
                signal.signal(number, previous)


def stop_words(signal_number):
    """How the line after a stop begins: "interrupted" for Ctrl-C, "terminated by SIGTERM" for SIGTERM."""
    return "interrupted" if signal_number == signal.SIGINT else f"terminated by {signal.Signals(signal_number).name}"


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (loading the data, evaluating, plotting): raised by the handler
    that `terminate_like_ctrl_c` installs, so the process ends as after Ctrl-C, in one line."""


@contextlib.contextmanager
def terminate_like_ctrl_c():
    """For a command-line program: while inside, SIGTERM raises Terminated where Ctrl-C would raise
    KeyboardInterrupt (the default action kills the process without a word). During training run()'s
    StopOnInterrupt takes both signals over, and a checkpoint is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training between two steps, after the checkpoint was written (under MPI:
    every rank stops at the same step, and rank 0 wrote the checkpoint). `exit_status`: 128 + the signal's
    number, as a shell reports a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM."""

    def __init__(self, message, signal_number=signal.SIGINT):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_status = 128 + signal_number
