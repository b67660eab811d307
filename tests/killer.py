"""A test-only callback that SIGKILLs its own process in the middle of an epoch (used via a YAML config)."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, epoch: int = 1, batch: int = 3) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no checkpoint: like a machine dying
