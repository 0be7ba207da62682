"""Ctrl-C around tensor parallelism: the ranks must leave a step together.

`sigint_ignored` starts worker processes with Ctrl-C ignored (it is rank 0's to handle);
`SigintHeld` makes rank 0 finish the step in flight before a Ctrl-C takes effect.
"""
import os
import signal
import threading


class sigint_ignored:
    """Start child processes with SIGINT ignored (they inherit it through exec)."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


class SigintHeld:
    """Hold a Ctrl-C until the block ends (the ranks must finish the step together), then
    deliver it. A second Ctrl-C raises at once, giving up the engine."""

    def __enter__(self):
        self.pending = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGINT)
            if callable(old):             # leave SIG_IGN / SIG_DFL / non-Python handlers alone
                self.old = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        os.write(2, b"nanovllm: Ctrl-C received, stopping after the current step (again to abort)\n")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            if self.pending:
                signal.raise_signal(signal.SIGINT)
