"""Recipe validation beyond types (launcher/config.py parses and type-checks): ranges, combinations, method
sections, secrets. Every failure is one UserError naming the field and the fix."""
from __future__ import annotations

import math

from launcher.config import METHOD_SECTION_KEYS, RecipeConfig, _did_you_mean, to_yaml_dict
from launcher.errors import UserError
from launcher.plan_types import MIN_MEMORY_FRACTION

# transformers' attention implementations, and the module each needs installed
ATTENTION = {"sdpa": None, "eager": None, "flex_attention": None, "flash_attention_2": "flash_attn",
             "flash_attention_3": "flash_attn_interface", "flash_attention_4": None}


def check_recipe(cfg: RecipeConfig) -> None:
    _check_ranges(cfg)
    _check_safety(cfg)
    _check_sections(cfg)


def _check_ranges(cfg: RecipeConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    from launcher.ds_config import check_plan_owned

    check_plan_owned(cfg.training)

    need(cfg.peft.r > 0, f"peft.r: must be a positive integer, got {cfg.peft.r}")
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
    need(cfg.plan.global_batch_size > 0,
         f"plan.global_batch_size: must be positive, got {cfg.plan.global_batch_size}")
    need(MIN_MEMORY_FRACTION <= cfg.plan.memory_fraction <= 1.0,
         f"plan.memory_fraction: must be in [{MIN_MEMORY_FRACTION}, 1.0], got {cfg.plan.memory_fraction}")
    need(cfg.plan.zero_stage is None or cfg.plan.zero_stage in (0, 1, 2, 3),
         f"plan.zero_stage: must be 0, 1, 2 or 3 (or null to let the planner choose), got {cfg.plan.zero_stage}")
    need(cfg.plan.micro_batch_size is None or cfg.plan.micro_batch_size > 0,
         f"plan.micro_batch_size: must be positive, got {cfg.plan.micro_batch_size}")
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
        for key in ("num_mini_batches", "local_rollout_forward_batch_size"):  # the planner sizes with them
            value = ppo.get(key)
            need(key not in ppo or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
                 f"ppo.{key}: must be a positive integer, got {value!r}")


def _check_sections(cfg: RecipeConfig) -> None:
    for section, values in cfg.method_args.items():
        if section not in (cfg.method, "pipeline"):
            raise UserError(f"{section}: this section is read by method {section} only, and this recipe's method is "
                            f"{cfg.method}; remove the section or set method: {section}")
        valid = METHOD_SECTION_KEYS[section]
        for key in values:
            if key not in valid:
                raise UserError(f"unknown config key '{section}.{key}'{_did_you_mean(str(key), valid)}; "
                                f"valid keys here: {', '.join(valid)}")


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
