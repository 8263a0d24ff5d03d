"""Trainer callbacks every recipe gets: a health guard (NaN/inf, exploding gradients), a one-line progress log, and the
checkpoint committer and final-step stop that make checkpoints safe to resume from (launcher/checkpoints.py)."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from launcher.checkpoints import (AlreadyTrained, flush_to_disk, mark_complete, newest_complete_checkpoint, rotate,
                                  unmark)
from launcher.preempt import barrier


class HealthGuard(TrainerCallback):
    """Stop on a non-finite loss or an exploding gradient norm, before that state is saved as a checkpoint.

    HF logs (and so calls `on_log`, the only hook that sees the loss) every `logging_steps`. The guard asks for a log
    at every optimizer step instead, so it sees each step's loss and gradient norm before that step's checkpoint is
    written (`on_log` runs before the save in the same step); ProgressPrinter still prints at `logging_steps`.
    Every rank sees the same values (the loss is gathered across ranks, the gradient norm is global), so all ranks
    stop at the same step."""

    def __init__(self, safety):
        self.stop_on_nan = safety.stop_on_nan
        self.max_grad_norm = safety.max_grad_norm_abort
        self.stop_reason = None

    @property
    def active(self) -> bool:
        return bool(self.stop_on_nan or self.max_grad_norm is not None)

    def on_step_end(self, args, state, control, **kwargs):
        if self.active:
            control.should_log = True
        return control

    def check(self, logs: dict) -> str | None:
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        if self.stop_on_nan and loss is not None and not math.isfinite(loss):
            return f"loss is {loss}"
        if self.stop_on_nan and grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if self.max_grad_norm is not None and grad_norm is not None and grad_norm > self.max_grad_norm:
            return f"gradient norm {grad_norm:.3g} exceeds safety.max_grad_norm_abort={self.max_grad_norm:g}"
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.stop_reason is not None:
            control.should_training_stop, control.should_save = True, False
            return control
        problem = self.check(logs or {})
        if problem:
            last = newest_complete_checkpoint(args.output_dir)
            kept = f"the last good checkpoint {last.name} is kept" if last else "no checkpoint was saved before it"
            self.stop_reason = (f"training diverged at step {state.global_step}: {problem}; {kept} (lower "
                                f"training.learning_rate, or raise safety.max_grad_norm_abort)")
            control.should_training_stop = True
            control.should_save = False  # never checkpoint a diverged state
        return control


# What the RL and preference trainers log about their objective, and the word the progress line gives it.
REWARD_KEYS = {"reward": "reward", "objective/scores": "score", "rewards/accuracies": "reward acc"}


class ProgressPrinter(TrainerCallback):
    """Rank 0 prints one line per log: step, loss, learning rate, tokens/s, ETA (and GPU memory when there is one)."""

    def __init__(self, ctx):
        self.enabled = ctx.env.is_main
        self.start = None
        self.start_step = 0
        self.start_tokens = 0
        self.losses = []
        self.first_step_done = None  # (time, step) after the first step: warm-up excluded from the ETA

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.time(), state.global_step
        self.start_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_done is None:
            self.first_step_done = (time.time(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs or "loss" not in logs or self.start is None:
            return
        # HealthGuard makes HF log every step; print at the user's logging_steps, with the mean loss since the last
        # printed line (what HF itself would have logged).
        self.losses.append(logs["loss"])
        every = _logging_every(args, state)
        due = (state.global_step % every == 0 or state.global_step >= state.max_steps
               or (args.logging_first_step and state.global_step == 1) or not math.isfinite(logs["loss"]))
        if not due:
            return
        loss = sum(self.losses) / len(self.losses)
        self.losses = []
        elapsed = max(time.time() - self.start, 1e-6)
        parts = [f"step {state.global_step}/{state.max_steps}", f"loss {loss:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        reward = next((k for k in REWARD_KEYS if k in logs), None)
        if reward is not None:  # GRPO/PPO/DPO: the loss alone says little about how training goes
            parts.append(f"{REWARD_KEYS[reward]} {logs[reward]:.3f}")
        tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        if tokens > 0:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        if self.first_step_done and state.global_step > self.first_step_done[1] and state.max_steps:
            # from the steps after the first: its data loading, allocations and kernel choices are one-off
            since, step = self.first_step_done
            eta = (state.max_steps - state.global_step) * (time.time() - since) / (state.global_step - step)
            parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        memory = _gpu_memory()
        if memory:
            parts.append(memory)
        print("  " + " | ".join(parts), file=sys.stdout, flush=True)


def _logging_every(args, state) -> int:
    steps = args.logging_steps
    if isinstance(steps, float) and steps < 1:  # a ratio of max_steps
        steps = math.ceil(state.max_steps * steps)
    return max(int(steps), 1)


def _gpu_memory() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return f"gpu mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


class CheckpointCommitter(TrainerCallback):
    """Marks each checkpoint complete once every rank has written it, then rotates (see the module docstring).

    Takes over `save_total_limit` from the HF Trainer: HF rotates *before* any callback sees the save, which with
    `save_total_limit=1` deletes the previous checkpoint before the new one is known complete."""

    def __init__(self, keep: int | None = None):
        self.keep = keep

    def take_over_rotation(self, args) -> None:
        if self.keep is None:
            self.keep = args.save_total_limit
        args.save_total_limit = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.take_over_rotation(args)

    def on_step_end(self, args, state, control, **kwargs):
        # A checkpoint-N already there (`--resume PATH` of an older one) is rewritten in place: unmark it first.
        if control.should_save and state.is_world_process_zero:
            unmark(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero and os.environ.get("LOCAL_RANK", "0") == "0" and path.is_dir():
            flush_to_disk(path)  # another node's shards: on disk before rank 0 marks them complete
        barrier()  # every rank's shard is written
        if state.is_world_process_zero and path.is_dir():
            ds = args.deepspeed if isinstance(args.deepspeed, dict) else {}
            mark_complete(path, {"world_size": args.world_size, "deepspeed": bool(args.deepspeed),
                                 "zero_stage": (ds.get("zero_optimization") or {}).get("stage")})
            rotate(Path(args.output_dir), self.keep, protect=(state.best_model_checkpoint,))
        barrier()
        return control


class StopAtFinalCheckpoint(TrainerCallback):
    """HF's loop takes one optimizer step before it compares the step count with max_steps, so a run resumed from
    its final checkpoint (killed after saving it, before it finished) would train one step too many. By
    `on_train_begin` the checkpoint's weights, optimizer and step are loaded: stop there, on every rank alike."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyTrained(state.global_step)
        return control


class UniversalLoadOnce(TrainerCallback):
    """A resume on a new rank count loads DeepSpeed's universal checkpoint (launcher/checkpoints.py); the engine
    keeps that switch for every later load, and a checkpoint this run writes has no universal copy, so loading
    the best model at the end would fail. Training begins after the resume load: switch it off there."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        engine = getattr(self.trainer, "model_wrapped", None)
        if hasattr(engine, "_config"):
            engine._config.load_universal_checkpoint = False
