"""Preemption: a warning signal -> checkpoint at the next optimizer step on every rank -> exit for requeue.

    cb = PreemptionCallback()              # installs SIGUSR1/SIGTERM handlers (main thread) that only set a flag
    trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=...)
    if cb.preempted:                       # a checkpoint-<step> was saved at cb.step
        sys.exit(PREEMPTED_EXIT_CODE)      # the sbatch script requeues; the next run resumes from it

At every `on_step_end` all ranks agree on the flag with an all-reduce (MAX) when torch.distributed is initialised,
so one rank's signal stops all ranks at the same step (they must save together: ZeRO checkpoints are collective).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from transformers import TrainerCallback

# Signals whose default action kills the process; after training a late warning must not kill a rank that is still
# writing the final model, so these are left ignored rather than restored to SIG_DFL.
_WARNING_SIGNALS = {signal.SIGUSR1, signal.SIGUSR2}


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (all-reduce MAX); just `flag` without torch.distributed."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return flag
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class PreemptionCallback(TrainerCallback):
    """Stop training cleanly, with a checkpoint, when one of `signals` arrives at any rank.

    Attributes after training: `preempted` (bool), `step` (global step of the saved checkpoint), `signal_name`
    (the signal this rank received, if any). The handlers are installed at construction (create the callback
    early, before loading the model, to catch an early warning), and restored at the end of training unless it
    was preempted (then a late SIGTERM only sets the flag while the rank finishes and exits).
    """

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM), install: bool = True, verbose: bool = True):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.preempted = False
        self.step: int | None = None
        self.signal_name: str | None = None
        self.verbose = verbose
        self._flag = False
        self._previous: dict = {}
        if install:
            self.install()

    # ---- signal handling -------------------------------------------------------------------------------------
    def install(self) -> bool:
        """Install the handlers; False (with a warning) outside the main thread, where Python cannot."""
        if threading.current_thread() is not threading.main_thread():
            print("ftlaunch: warning: preemption handlers not installed (not the main thread)", file=sys.stderr)
            return False
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return True

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if previous in (None, signal.SIG_DFL) and sig in _WARNING_SIGNALS:
                previous = signal.SIG_IGN
            try:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag: the training loop acts on it at the next step boundary.
        self._flag = True
        self.signal_name = signal.Signals(signum).name
        try:
            os.write(2, f"ftlaunch: rank got {self.signal_name}; will checkpoint and stop after this step\n".encode())
        except OSError:
            pass

    def request(self) -> None:
        """Ask for a preemption stop as if a signal had arrived (tests, other triggers)."""
        self._flag = True

    @property
    def requested(self) -> bool:
        return self._flag

    # ---- trainer hooks ---------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted:
            return control
        if any_rank(self._flag):
            self.preempted = True
            self.step = state.global_step
            control.should_save = True
            control.should_training_stop = True
            # The warning window is for the checkpoint: no evaluation first (HF's flow callback may have asked for
            # one this step), and no reloading the best checkpoint after the loop (load_best_model_at_end); the
            # process exits for requeue right after, and the resumed run evaluates on schedule.
            control.should_evaluate = False
            args.load_best_model_at_end = False
            if self.verbose and state.is_world_process_zero:
                print(f"ftlaunch: preemption requested: saving checkpoint-{state.global_step} and stopping",
                      flush=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        # No rank may exit -- and get its node's ranks killed by srun/torchrun for exiting non-zero -- before the
        # preemption checkpoint is complete on every rank.
        if self.preempted:
            barrier()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # After a preemption the handlers stay: a SIGTERM that a launcher sends because another rank has already
        # exited must not kill this rank while it still writes the run's manifest. It exits by itself right after.
        if not self.preempted:
            self.uninstall()
        return control


def barrier() -> None:
    """All ranks wait for each other (no-op without torch.distributed); call before exiting after a preemption."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
