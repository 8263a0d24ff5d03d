"""Recipe validation beyond types (launcher/config.py parses and type-checks): ranges, combinations, method
sections, secrets. Every failure is one UserError naming the field and the fix."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from launcher.config import METHOD_SECTION_KEYS, RecipeConfig, _did_you_mean, to_yaml_dict
from launcher.errors import UserError
from launcher.plan_types import MIN_MEMORY_FRACTION

# Far above any real run (Llama 3 405B trained with 2048 sequences per step): a larger value is a typo.
MAX_GLOBAL_BATCH = 2 ** 20

# transformers' attention implementations, and the module each needs installed
ATTENTION = {"sdpa": None, "eager": None, "flex_attention": None, "flash_attention_2": "flash_attn",
             "flash_attention_3": "flash_attn_interface", "flash_attention_4": None}


def check_recipe(cfg: RecipeConfig) -> None:
    _check_ranges(cfg)
    _check_safety(cfg)
    _check_sections(cfg)
    _check_tiny_model(cfg)


def _check_ranges(cfg: RecipeConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    from launcher.ds_config import check_plan_owned, gradient_clipping

    check_plan_owned(cfg.training)
    for key, value in cfg.training.items():  # .inf/.nan parse as numbers; no TrainingArguments value means them
        need(not (isinstance(value, float) and not math.isfinite(value)),
             f"training.{key}: must be a finite number, got {value!r}")
    gradient_clipping(cfg)

    need(cfg.peft.r > 0, f"peft.r: must be a positive integer, got {cfg.peft.r}")
    need(cfg.peft.alpha > 0, f"peft.alpha: must be a positive integer (LoRA scales its update by alpha / r), "
                             f"got {cfg.peft.alpha}")
    need(cfg.peft.target_modules not in ([], ""),
         "peft.target_modules: empty; give module names such as [q_proj, v_proj], or all-linear")
    need(cfg.peft.num_virtual_tokens > 0,
         f"peft.num_virtual_tokens: must be a positive integer, got {cfg.peft.num_virtual_tokens}")
    need(0 <= cfg.peft.dropout < 1, f"peft.dropout: must be in [0, 1), got {cfg.peft.dropout}")
    need(cfg.data.max_length >= 8, f"data.max_length: must be at least 8, got {cfg.data.max_length}")
    need(0 <= cfg.data.eval_ratio < 1, f"data.eval_ratio: must be in [0, 1), got {cfg.data.eval_ratio}")
    need(cfg.data.num_examples > 0, f"data.num_examples: must be positive, got {cfg.data.num_examples}")
    need(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2 ** 32, f"seed: must be in [0, 2**32), got {cfg.seed}")
    attn = cfg.model.attn_implementation
    need(attn is None or attn in ATTENTION or "/" in attn,  # "org/kernel": a hub kernel transformers fetches
         f"model.attn_implementation: '{attn}' is not one of {', '.join(ATTENTION)} (or a hub kernel 'org/name')")
    need(cfg.eval.num_examples >= 0,
         f"eval.num_examples: must be 0 (no before/after evaluation) or positive, got {cfg.eval.num_examples}")
    need(cfg.eval.max_new_tokens > 0, f"eval.max_new_tokens: must be a positive integer, got {cfg.eval.max_new_tokens}")
    need(cfg.eval.samples >= 0, f"eval.samples: must be 0 or positive, got {cfg.eval.samples}")
    need(0 < cfg.plan.global_batch_size <= MAX_GLOBAL_BATCH,
         f"plan.global_batch_size: must be in [1, {MAX_GLOBAL_BATCH}], got {cfg.plan.global_batch_size}")
    need(MIN_MEMORY_FRACTION <= cfg.plan.memory_fraction <= 1.0,
         f"plan.memory_fraction: must be in [{MIN_MEMORY_FRACTION}, 1.0], got {cfg.plan.memory_fraction}")
    need(cfg.plan.zero_stage is None or cfg.plan.zero_stage in (0, 1, 2, 3),
         f"plan.zero_stage: must be 0, 1, 2 or 3 (or null to let the planner choose), got {cfg.plan.zero_stage}")
    need(cfg.plan.micro_batch_size is None or cfg.plan.micro_batch_size > 0,
         f"plan.micro_batch_size: must be positive, got {cfg.plan.micro_batch_size}")
    if cfg.plan.inventory is not None:  # `ftlaunch plan`'s what-if (a run plans for its hardware): a typo fails now
        from launcher.inventory import parse_spec

        try:
            parse_spec(cfg.plan.inventory, host_ram_bytes=1)  # host RAM given: nothing is probed
        except UserError as e:
            raise UserError(f"plan.inventory: {e}") from None
    lr = cfg.training.get("learning_rate")
    need(lr is None or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0),
         f"training.learning_rate: must be a positive number, got {lr!r}")
    steps = cfg.training.get("max_steps")
    need(steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps != 0 and steps >= -1),
         f"training.max_steps: must be a positive integer (or -1 for epochs), got {steps!r}")
    if cfg.quant.load_in_4bit or cfg.method == "qlora":
        need(cfg.peft.method in ("lora", "dora"),
             "quant.load_in_4bit: QLoRA trains adapters only; set peft.method=lora (full fine-tuning of 4-bit "
             "weights is not possible)")
    if cfg.method == "ppo":
        ppo = cfg.method_args.get("ppo") or {}
        need(bool(ppo.get("reward_model")),
             "ppo.reward_model: PPO needs a reward model; set ppo.reward_model to a trained rm output dir")


def _check_sections(cfg: RecipeConfig) -> None:
    for section, values in cfg.method_args.items():
        if section not in (cfg.method, "pipeline"):
            raise UserError(f"{section}: this section is read by method {section} only, and this recipe's method is "
                            f"{cfg.method}; remove the section or set method: {section}")
        valid = METHOD_SECTION_KEYS[section]
        rules = METHOD_SECTION_RULES.get(section, {})
        for key, value in values.items():
            if key not in valid:
                raise UserError(f"unknown config key '{section}.{key}'{_did_you_mean(str(key), valid)}; "
                                f"valid keys here: {', '.join(valid)}")
            if key in rules:
                rules[key].check(f"{section}.{key}", value)
    grpo = cfg.method_args.get("grpo") or {}
    weights, rewards = grpo.get("reward_weights"), grpo.get("reward", "arith")
    count = len(rewards) if isinstance(rewards, list) else 1
    if weights is not None and len(weights) != count:
        raise UserError(f"grpo.reward_weights: give one weight per reward ({count}), got {len(weights)}")


@dataclass(frozen=True)
class Rule:
    """What a method-section value must be: `need` completes "must be ..." in the error; `choices` feed the
    did-you-mean; `nullable`: the method module reads null as its default."""

    need: str
    ok: Callable[[object], bool]
    choices: tuple = ()
    nullable: bool = False

    def check(self, where: str, value) -> None:
        if (value is None and self.nullable) or (value is not None and self.ok(value)):
            return
        wrong = [v for v in (value if isinstance(value, list) else [value]) if v not in self.choices]
        hint = _did_you_mean(wrong[0], self.choices) if self.choices and wrong and isinstance(wrong[0], str) else ""
        raise UserError(f"{where}: must be {self.need}, got {value!r}{hint}")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: int, nullable: bool = False) -> Rule:
    return Rule("a positive integer" if low == 1 else f"an integer >= {low}",
                lambda v: _integer(v) and v >= low, nullable=nullable)


def _above(low: float, inclusive: bool = False, nullable: bool = False) -> Rule:
    return Rule(f"a number {'>=' if inclusive else '>'} {low:g}",
                lambda v: _number(v) and (v >= low if inclusive else v > low), nullable=nullable)


def _one_of(*choices, nullable: bool = False, as_list: bool = False) -> Rule:
    """A value among `choices`; `as_list`: or a non-empty list of them (DPO combines several losses)."""
    def ok(value) -> bool:
        values = value if as_list and isinstance(value, list) and value else [value]
        return all(isinstance(v, (str, bool)) and v in choices for v in values)

    return Rule(f"one of {', '.join(map(str, choices))}" + (" (or a list of them)" if as_list else ""), ok,
                tuple(c for c in choices if isinstance(c, str)), nullable)


def _names(value) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, str) and v.strip() for v in values)


POSITIVE_INT, NON_NEGATIVE_INT = _at_least(1), _at_least(0)
POSITIVE, NON_NEGATIVE = _above(0), _above(0, inclusive=True)
FRACTION = Rule("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
PATH = Rule("a model directory or hub id (a string)", lambda v: isinstance(v, str) and bool(v.strip()))
# TRL 1.12's accepted values (DPOTrainer's loss switch, GRPOConfig's docs): a typo otherwise fails only after the
# models have loaded, or never (GRPO silently treats an unknown scale_rewards as "group").
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")

# recipes/rewards.py's REWARDS, by name (config checks and the planner stay free of the recipes' imports; a test keeps
# them equal): any other grpo.reward is a reward model
REWARD_FUNCTIONS = ("arith", "exact", "digits")

# The values of each method section's keys (launcher/config.py lists the keys), checked when the recipe loads: so
# `plan`, `slurm` and `pipeline --dry-run` refuse what `run` would otherwise fail on, often only mid-run.
METHOD_SECTION_RULES: dict[str, dict[str, Rule]] = {
    "rm": {"center_rewards_coefficient": _above(0, inclusive=True, nullable=True)},
    "ppo": {"reward_model": PATH, "value_model": Rule(PATH.need, PATH.ok, nullable=True),
            "response_length": POSITIVE_INT, "num_ppo_epochs": POSITIVE_INT, "num_mini_batches": POSITIVE_INT,
            "local_rollout_forward_batch_size": POSITIVE_INT, "kl_coef": NON_NEGATIVE,
            "kl_estimator": _one_of("k1", "k3"), "temperature": POSITIVE,
            "missing_eos_penalty": _above(0, inclusive=True, nullable=True),
            "cliprange": POSITIVE, "cliprange_value": POSITIVE, "vf_coef": NON_NEGATIVE, "gamma": FRACTION,
            "lam": FRACTION, "whiten_rewards": Rule("true or false", lambda v: isinstance(v, bool))},
    "dpo": {"beta": POSITIVE, "loss_type": _one_of(*DPO_LOSS_TYPES, nullable=True, as_list=True)},
    "grpo": {"reward": Rule(f"a reward function name ({', '.join(REWARD_FUNCTIONS)}) or a reward model directory, or "
                            "a list of them", _names),
             "reward_weights": Rule("a list of numbers, one per reward",
                                    lambda v: isinstance(v, list) and all(_number(w) for w in v), nullable=True),
             "num_generations": _at_least(2), "max_completion_length": POSITIVE_INT,
             "beta": _above(0, inclusive=True, nullable=True), "temperature": POSITIVE,
             "loss_type": _one_of(*GRPO_LOSS_TYPES), "scale_rewards": _one_of("group", "batch", "none", True, False)},
    "classify": {"metric": _one_of("accuracy", "f1"), "early_stopping_patience": NON_NEGATIVE_INT,
                 "early_stopping_threshold": NON_NEGATIVE, "eval_steps": POSITIVE_INT,
                 "class_weights": Rule("none, auto or a list of non-negative numbers (one per label)",
                                       lambda v: v in ("none", "auto", False) or isinstance(v, list) and all(
                                           _number(w) and w >= 0 for w in v), nullable=True),
                 "freeze_layers": _at_least(0, nullable=True), "num_labels": _at_least(2, nullable=True)},
}


def _check_tiny_model(cfg: RecipeConfig) -> None:
    """model.tiny: LlamaConfig names and positive sizes (launcher/shapes.py reads it, torch-free)."""
    if cfg.model.name == "tiny" or cfg.model.tiny:
        from launcher.shapes import tiny_shape

        tiny_shape(cfg.model.tiny)


def _check_safety(cfg: RecipeConfig) -> None:
    """The `safety:` section, and no secrets in a recipe or its overrides: they would land in training_args.bin,
    which the HF Trainer pickles unredacted into every checkpoint."""
    from launcher.manifest import SECRET_VALUE, is_secret_key

    keep = cfg.safety.keep_checkpoints
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise UserError(f"safety.keep_checkpoints: must be at least 1 (the last good checkpoint is always kept), "
                        f"got {keep!r}")
    limit = cfg.safety.max_grad_norm_abort
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise UserError(f"safety.max_grad_norm_abort: must be a positive number (or null for no limit), got {limit!r}")
    for where, key, value in walk(to_yaml_dict(cfg)):
        if (is_secret_key(key) and value not in (None, "", False)) or (
                isinstance(value, str) and SECRET_VALUE.match(value.strip())):
            raise UserError(f"{where}: looks like a secret; secrets must not be in recipes or overrides (they would be "
                            f"written into the output directory); set it in the environment instead (HF_TOKEN, "
                            f"WANDB_API_KEY, ...)")


def walk(data, prefix: str = ""):
    """(where, key, value) for every key of nested data, and (where, "", text) for strings inside lists."""
    if isinstance(data, dict):
        for k, v in data.items():
            where = f"{prefix}.{k}" if prefix else str(k)
            yield where, str(k), v
            yield from walk(v, where)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from walk(v, f"{prefix}[{i}]")
    elif isinstance(data, str) and prefix.endswith("]"):
        yield prefix, "", data
