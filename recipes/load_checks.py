"""Checks around model loading that turn what would be a traceback deep inside transformers or PEFT into one line
naming the field (LoRA targets, attention backends), and the one LOAD REPORT that is expected (a fresh head)."""
from __future__ import annotations

import contextlib

from launcher.errors import UserError


def check_lora_targets(cfg, model) -> None:
    """peft.target_modules names modules of this model, by PEFT's own rule (checked before the trainer wraps it:
    PEFT's error is a traceback from deep inside the trainer): a list entry matches a module's full name or a dotted
    suffix of it ('q_proj', 'self_attn.q_proj'); a single string is a regular expression over full names."""
    import re

    targets = cfg.peft.target_modules
    if cfg.peft.method not in ("lora", "dora") or targets in (None, "all-linear"):
        return
    full = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in full):
            raise UserError(f"peft.target_modules: the string {targets!r} is a regular expression over full module "
                            f"names and matches none; give a list of names, e.g. [q_proj, v_proj], or all-linear")
        return
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in full)]
    if missing:
        import torch

        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("Linear")})
        raise UserError(f"peft.target_modules: {', '.join(map(repr, missing))} not in this model; its linear layers: "
                        f"{', '.join(linear)} (or all-linear)")


def check_attention_installed(name) -> None:
    """flash-attention is a separate (GPU-only) package: say so in one line before the load fails on it."""
    import importlib.util

    from launcher.config_checks import ATTENTION

    import torch

    if name and name.startswith("flash_attention") and not torch.cuda.is_available():
        raise UserError(f"model.attn_implementation: {name} runs on CUDA GPUs only, and there is none here; use sdpa "
                        f"(the default)")
    module = ATTENTION.get(name)
    # without the package transformers can fetch a hub kernel instead, when `kernels` is installed (and online)
    if module and importlib.util.find_spec(module) is None and importlib.util.find_spec("kernels") is None:
        raise UserError(f"model.attn_implementation: {name} needs the {module} package, not installed here (GPU "
                        f"only); install it, or use sdpa (the default)")


# The parameters a classification or reward head adds to a pretrained body: new by design, not a loading problem.
NEW_HEAD_PREFIXES = ("score.", "classifier.", "pre_classifier.")


@contextlib.contextmanager
def new_head_expected():
    """Around a load that adds a fresh classification or reward head to a pretrained body (rm/classify training and
    their "before" evaluation): transformers' LOAD REPORT table listing that head as missing is dropped. Any other
    missing or unexpected key still shows, and loads outside this context (a reward model PPO scores with, whose
    head must be trained) report everything."""
    from transformers.utils import logging as hf_logging

    def only_new_head(record) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if line.count("|") >= 2]
        rows = [r for r in rows if r[0] not in ("Key", "") and not set(r[0]) <= {"-", "+"}]
        return not rows or not all("MISSING" in r[1] and r[0].startswith(NEW_HEAD_PREFIXES) for r in rows)

    logger = hf_logging.get_logger("transformers.modeling_utils")
    logger.addFilter(only_new_head)
    try:
        yield
    finally:
        logger.removeFilter(only_new_head)
