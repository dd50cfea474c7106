"""Stopping pretraining on SIGTERM / SIGINT: a handler installed for the whole run, and the
Trainer callback that saves the current step at the first point of the loop after a signal."""

from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import checkpoints as ckpt
from .errors import MixGeneformerError, TrainingDivergedError

logger = logging.getLogger(__name__)

SIGNAL_SYNC_STEPS = 10  # distributed runs check for a stop signal every this many steps


class TrainingInterrupted(MixGeneformerError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; resume with ``--resume``."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequested(Exception):
    """Raised out of the Trainer's loop once the checkpoint for a stop signal is saved."""


class SignalFlag:
    """SIGTERM / SIGINT handler for a whole run, installed before any data is read.

    While the run is being set up (``training`` False) a signal stops it at once (nothing is saved
    yet); once training runs it only sets ``received``, which :class:`StopOnSignal` acts on at the
    next point of the loop. A second signal stops at once. A process forked from this one
    (DataLoader workers) gets the default action, so it ends as usual.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.training = False
        self.previous: dict[int, Any] = {}
        self.pid = os.getpid()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():  # None: a handler set outside Python, which cannot be restored
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked worker: behave as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = self.received is None
        self.received = signum
        if not self.training or not first:  # outside the training loop, or a second signal: stop right away
            self.uninstall()
            raise TrainingInterrupted(
                f"stopped by signal {signum} {'outside a training step' if first else '(a second one)'}; nothing "
                "new was saved. Continue with --resume.", signum,
            )
        logger.warning("received signal %s: saving a checkpoint now, then stopping", signum)


class StopOnSignal(TrainerCallback):
    """Act on a :class:`SignalFlag` at the first point of the loop after the signal: save a
    checkpoint of the current step (unless one exists), stop, then exit non-zero.

    One process: checked before each step (the signal came during data loading or after the
    previous step's save; at an epoch's first step, one more step runs: see on_step_begin), after each step, after logging and evaluation (the checkpoint is
    saved right after) and after a save. Several ranks: checked at the end of every
    ``SIGNAL_SYNC_STEPS``-th step, where the ranks agree with one collective.
    """

    def __init__(self, signals: SignalFlag) -> None:
        self.signals = signals
        self.trainer: Any = None  # set once the Trainer exists
        self.epoch_start = -1  # the step the current epoch began at

    @property
    def received(self) -> int | None:
        return self.signals.received

    def _now(self, args) -> bool:
        return self.signals.received is not None and args.world_size == 1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self._now(args):
            step = state.global_step
            if step > 0 and ckpt.checkpoint_problem(Path(args.output_dir) / f"checkpoint-{step}") is not None:
                if step == self.epoch_start:
                    # This epoch's data loader drew its seed from the torch RNG after step `step` ended: saved now,
                    # the checkpoint would resume unlike a straight run. The step runs; on_step_end saves it.
                    return
                self.trainer._save_checkpoint(self.trainer.model, trial=None)
            raise StopRequested()

    def on_log(self, args, state, control, **kwargs):
        if self._now(args):
            control.should_save = True
            control.should_training_stop = True

    on_evaluate = on_log

    def on_save(self, args, state, control, **kwargs):
        if self._now(args):
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        flag = 0 if self.received is None else int(self.received)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and state.global_step % SIGNAL_SYNC_STEPS:
            return control  # ranks agree on a stop only every SIGNAL_SYNC_STEPS steps (one tiny collective)
        if distributed:
            # One rank's signal stops every rank at the same step (else the others would hang).
            tensor = torch.tensor([flag], device=args.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = int(tensor.item())
        if flag:
            self.signals.received = flag
            control.should_save = True
            control.should_training_stop = True
        return control


#: logged values whose non-finite value means the weights are lost (a grad norm may be inf under fp16 loss scaling)
LOSS_NAMES = ("loss", "mlm_loss", "contrastive_loss", "cross_species_loss", "eval_loss")


class StopOnDivergence(TrainerCallback):
    """Stop a run whose logged loss (or loss part, or evaluation loss) is no longer finite, with a
    :class:`TrainingDivergedError` naming the step and the settings of ``section`` to change. Under
    fp16 one window may overflow and be skipped by the loss scaler, so there it takes 3 windows in a
    row. Every rank sees the same averaged values and stops together."""

    def __init__(self, section: str) -> None:
        self.section = section
        self.bad_windows = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = {k: v for k, v in (logs or {}).items() if k in LOSS_NAMES and isinstance(v, float) and not math.isfinite(v)}
        self.bad_windows = self.bad_windows + 1 if bad else 0
        if self.bad_windows >= (3 if args.fp16 else 1):
            raise TrainingDivergedError(
                f"training diverged at step {state.global_step}: {', '.join(f'{k}={v}' for k, v in bad.items())}. "
                f"Start again with a lower {self.section}.learning_rate (now {args.learning_rate:g}) or more "
                f"{self.section}.warmup_steps" + (" or a train.max_grad_norm; checkpoints saved after the last finite "
                "loss may hold non-finite weights." if self.section == "train" else ".")
            )
