"""Rewards for GRPO and for PPO's evaluation: Python functions by name, and trained reward models.

A recipe names a reward (`grpo.reward: arith`), never code: only the functions registered here can be chosen, so a
config file cannot make ftlaunch evaluate anything. A reward is either a name from `REWARDS` or the path of a
trained reward model (an `rm` run's output: a full model or a LoRA adapter on its base), or a hub id (`org/name`).

Reward functions follow TRL's GRPO signature: `f(prompts, completions, **dataset_columns) -> list[float]`.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Callable

from launcher.config import RUNS_DIR
from launcher.errors import UserError
from recipes import synthetic
from recipes.builder import loading, on_local_gpu
from recipes.merge import is_adapter_dir, merged_dir
from recipes.load_checks import new_head_expected


def exact_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the completion's first word is the answer (from the dataset's `answer` column, or solved), else 0."""
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        target = answer[i] if answer is not None else synthetic.solve(synthetic.last_user_text(prompt))
        out.append(float(target is not None and synthetic.exact_match(completion, str(target))))
    return out


def digits_reward(prompts, completions, **kwargs) -> list[float]:
    """Shaping only: 1.0 when the completion is a bare number (the answer's format), else 0."""
    return [float(synthetic.first_answer(synthetic.text_of(c)).isdigit()) for c in completions]


REWARDS: dict[str, Callable] = {
    "arith": synthetic.arith_reward,  # 1 exact answer, 0.1 a wrong number, 0 otherwise
    "exact": exact_reward,
    "digits": digits_reward,
}


def reward_function(name: str, field: str = "grpo.reward") -> Callable:
    if name not in REWARDS:
        close = difflib.get_close_matches(name, REWARDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{field}: unknown reward '{name}'{hint}; choose one of {', '.join(REWARDS)} or give the "
                        f"output directory of a trained reward model (an rm run)")
    return REWARDS[name]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", as the hub spells repo ids


def is_hub_id(value: str) -> bool:
    """`org/name` that is not a local directory: from_pretrained looks it up on the hub (or its offline cache), as
    transformers itself decides. `runs/rm`, `runs/rlhf/rm`, `./rm` or `data/rm` (an existing folder) stay paths, and
    a missing one fails at once naming the field (not after a minute of hub retries)."""
    first = value.split("/", 1)[0]
    return bool(HUB_ID.match(value)) and not Path(value).exists() and first != RUNS_DIR and not Path(first).is_dir()


def looks_like_path(value: str) -> bool:
    if is_hub_id(value):
        return False
    return value.startswith((".", "/", "~")) or os.sep in value or Path(value).expanduser().exists()


def check_model_dir(value: str, field: str) -> Path:
    """A trained model directory (full model or adapter); a missing one is a one-line UserError naming the field."""
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"{field}: '{value}' does not exist; train it first (e.g. `ftlaunch run --recipe rm_tiny "
                        f"output_dir={value}`) or point {field} at a reward model directory")
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise UserError(f"{field}: '{value}' holds no model (no config.json or adapter_config.json); "
                        f"is the run finished?")
    return path


def full_model_dir(value: str, field: str, auto_class=None, **load_kwargs) -> str:
    """Path of a full model for `value` (a model dir, or an adapter dir merged into its base). Called in a recipe's
    build, on every rank (merged_dir's every_rank)."""
    path = check_model_dir(value, field)
    return str(merged_dir(path, auto_class, every_rank=True, **load_kwargs) if is_adapter_dir(path) else path)


def load_scorer_model(path: str, dtype=None, pad_token_id=None, num_labels: int = 1, seed=None,
                      trust_remote_code: bool = False):
    """A sequence-classification model (a reward model has one output), plain (not a PeftModel), in eval mode; an
    adapter dir is merged into its base first. With `seed`, a head the checkpoint lacks is initialised from it, so
    a "before" score (base + fresh head) is repeatable without touching the global RNG."""
    import contextlib

    import torch
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels, "trust_remote_code": trust_remote_code}  # the recipe's model.trust_remote_code
    if dtype is not None:
        kwargs["dtype"] = dtype
    if is_adapter_dir(path):
        path = str(merged_dir(path, AutoModelForSequenceClassification, num_labels=num_labels))
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        with new_head_expected() if seed is not None else contextlib.nullcontext():  # seed: a fresh head on purpose
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.eval()
    return on_local_gpu(model, "the reward model")


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """Reward-model scores of full texts (prompt + response), tokenised the way TRL's RewardTrainer tokenises:
    special tokens added (bos), eos appended; the score is read at the last non-pad token."""
    import torch

    eos = tokenizer.eos_token or ""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    scores: list[float] = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = [t if t.endswith(eos) else t + eos for t in texts[i:i + batch_size]]
            batch = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                logits = model(**batch).logits
            scores += logits[:, 0].float().tolist()
    finally:
        tokenizer.padding_side = side
    return scores


def reward_model_function(path: str, tokenizer, field: str = "grpo.reward", dtype=None,
                          trust_remote_code: bool = False) -> Callable:
    """A trained reward model as a GRPO reward function, scoring exactly the text layout the model was trained on
    (TRL's built-in string-path reward models tokenise without bos/eos, which a tiny reward model never saw)."""
    with loading(field, path):
        source = path if is_hub_id(path) else full_model_dir(path, field)
        model = load_scorer_model(source, dtype=dtype, pad_token_id=tokenizer.pad_token_id,
                                  trust_remote_code=trust_remote_code)

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        texts = [synthetic.last_user_text(p) + synthetic.text_of(c) for p, c in zip(prompts, completions)]
        return score_texts(model, tokenizer, texts)

    reward_model.__name__ = f"reward_model:{Path(path).name}"
    return reward_model


def resolve(name_or_path: str, tokenizer, field: str = "grpo.reward", dtype=None,
            trust_remote_code: bool = False) -> Callable:
    """`grpo.reward`: a registered function name, or a reward model directory (loaded in `dtype`: the plan's,
    which counts a whole copy per rank)."""
    if name_or_path not in REWARDS and (looks_like_path(name_or_path) or is_hub_id(name_or_path)):
        return reward_model_function(name_or_path, tokenizer, field, dtype, trust_remote_code)
    return reward_function(name_or_path, field)


def pairwise_accuracy(model, tokenizer, rows: list[dict]) -> dict:
    """Fraction of preference pairs whose chosen text outscores the rejected one, and the mean margin."""
    chosen = score_texts(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows])
    rejected = score_texts(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows])
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {"pairwise_accuracy": sum(wins) / max(len(wins), 1),
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / max(len(wins), 1), "n": len(wins)}


def reward_evaluator(ctx, rows: list[dict], model_loader, reward_fns: dict, scorer=None):
    """Evaluator for prompt-only tasks (GRPO, PPO): greedy answers to held-out prompts, scored by each reward
    function (`reward/<name>` means), by a reward model (`score`, when `scorer(prompts, completions)` is given) and,
    where the rows carry an `answer` (synthetic tasks), by exact match (`accuracy`)."""
    from recipes.common import generate

    cfg = ctx.cfg
    rows = [r for r in rows if isinstance(r.get("prompt"), str)][: cfg.eval.num_examples]
    if not rows:
        return None

    def evaluate(when: str) -> dict:
        model, tokenizer = model_loader(when)
        prompts = [r["prompt"] for r in rows]
        completions = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens)
        del model
        extra = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        out: dict = {}
        if "answer" in extra and all(a is not None for a in extra["answer"]):
            hits = [synthetic.exact_match(c, str(a)) for c, a in zip(completions, extra["answer"])]
            out["accuracy"] = sum(hits) / len(hits)
        for name, fn in reward_fns.items():
            values = fn(prompts=prompts, completions=completions, **extra)
            values = [v for v in values if v is not None]
            out[f"reward/{name}"] = sum(values) / max(len(values), 1)
        if scorer is not None:
            scores = scorer(prompts, completions)
            out["score"] = sum(scores) / max(len(scores), 1)
        out["n"] = len(rows)
        out["samples"] = [{"prompt": p, "expected": str(r.get("answer", "")), "generated": c.strip()}
                          for p, r, c in zip(prompts[: cfg.eval.samples], rows, completions)]
        return out

    return evaluate
