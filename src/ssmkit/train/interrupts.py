"""Stopping on SIGINT/SIGTERM: the trainer saves a checkpoint after the current step, then raises
:class:`TrainingInterrupted`; a second signal stops at once."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ssmkit.train")


class TrainingInterrupted(Exception):
    """Raised by :meth:`Trainer.train` after a SIGINT/SIGTERM, once the checkpoint is saved."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped at step {step}; checkpoint saved to {checkpoint}")




class SignalsMixin:
    """The :class:`~ssmkit.train.Trainer`'s signal handlers (set ``_signal``; the loop checks it after each step)."""

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return old

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and self.ddp is not None and time.monotonic() - self._signal_time < 5.0:
            return  # Ctrl-C in a terminal reaches a worker twice: directly and forwarded by torchrun
        if self._signal is not None:  # a second signal: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._signal, self._signal_time = signum, time.monotonic()
        if not self.is_main:
            return
        log.warning("%s received: saving a checkpoint after this step (send again to stop immediately)",
                    signal.Signals(signum).name)
