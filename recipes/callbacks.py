"""Trainer callbacks every recipe gets: a health guard (NaN/inf, exploding gradients) and a one-line progress log."""
from __future__ import annotations

import math
import sys
import time

from transformers import TrainerCallback


class HealthGuard(TrainerCallback):
    """Stop on a non-finite loss or an exploding gradient norm, before that state is saved as a checkpoint."""

    def __init__(self, safety):
        self.stop_on_nan = safety.stop_on_nan
        self.max_grad_norm = safety.max_grad_norm_abort
        self.stop_reason = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        problem = None
        if self.stop_on_nan and loss is not None and not math.isfinite(loss):
            problem = f"loss is {loss}"
        elif self.stop_on_nan and grad_norm is not None and not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm}"
        elif self.max_grad_norm is not None and grad_norm is not None and grad_norm > self.max_grad_norm:
            problem = f"gradient norm {grad_norm:.3g} exceeds safety.max_grad_norm_abort={self.max_grad_norm}"
        if problem:
            self.stop_reason = (f"training diverged at step {state.global_step}: {problem}; the last good "
                                f"checkpoint is kept (lower training.learning_rate or raise the threshold)")
            control.should_training_stop = True
            control.should_save = False  # never checkpoint a diverged state
        return control


class ProgressPrinter(TrainerCallback):
    """Rank 0 prints one line per log: step, loss, learning rate, tokens/s, ETA (and GPU memory when there is one)."""

    def __init__(self, ctx):
        self.enabled = ctx.env.is_main
        self.start = None
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.time(), state.global_step
        self.start_tokens = getattr(state, "num_input_tokens_seen", 0) or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs or "loss" not in logs or self.start is None:
            return
        elapsed = max(time.time() - self.start, 1e-6)
        done = state.global_step - self.start_step
        parts = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        tokens = (getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        if tokens > 0:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        if done > 0 and state.max_steps:
            eta = (state.max_steps - state.global_step) * elapsed / done
            parts.append(f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        memory = _gpu_memory()
        if memory:
            parts.append(memory)
        print("  " + " | ".join(parts), file=sys.stdout, flush=True)


def _gpu_memory() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return f"gpu mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
