"""A test-only callback that SIGKILLs (or SIGTERMs) its own process in the middle of an epoch (via a YAML config)."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, epoch: int = 1, batch: int = 3, sig: str = "SIGKILL") -> None:
        self.epoch, self.batch, self.sig = epoch, batch, getattr(signal, sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.sig)  # SIGKILL: no cleanup, no checkpoint, like a machine dying
