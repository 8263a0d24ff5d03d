"""From a validated recipe to the planner's PlanRequest: method, sequence length, batch, pins, and every model the
method holds (DPO's reference, PPO's reference/reward/value), shapes resolved offline. Pure; no torch."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from launcher.config_checks import REWARD_FUNCTIONS
from launcher.errors import UserError
from launcher.memory import DPO_LOGIT_BYTES, GRPO_LOGIT_BYTES, SFT_LOSS_CHUNK_TOKENS
from launcher.planner import ExtraModel, PlanRequest
from launcher.shapes import ModelShape, resolve_shape


def request_from_recipe(cfg) -> PlanRequest:
    """A validated RecipeConfig (read by attribute) -> PlanRequest, the policy's shape resolved offline."""
    notes = []
    if cfg.method == "qlora" or cfg.quant.load_in_4bit:
        method = "qlora"
    elif cfg.peft.method != "none":
        method = "lora"
    else:
        method = "full"
    shape = resolve_shape(cfg.model.name, cfg.model.tiny)
    if cfg.method in ("rm", "classify"):  # AutoModelForSequenceClassification: a score head, no lm_head
        shape = replace(shape, score_head=True)
    trainable = None
    peft_method = cfg.peft.method
    if peft_method in ("prompt_tuning", "prefix_tuning"):
        tokens = getattr(cfg.peft, "num_virtual_tokens", 16)
        trainable = tokens * shape.hidden * (2 * shape.layers if peft_method == "prefix_tuning" else 1)
        notes.append(f"{peft_method}: {trainable} trainable parameters")
    plan_cfg = cfg.plan
    checkpointing = plan_cfg.gradient_checkpointing
    if peft_method == "prefix_tuning":
        # the prefix enters each layer as past key values, which transformers drops in a checkpointed forward
        # (use_cache=False): its attention then fails on mismatched lengths (tried, transformers 5.25)
        if checkpointing:
            raise UserError("plan.gradient_checkpointing: prefix tuning cannot train with checkpointing (its prefix "
                            "is dropped on recompute); set it to false, or use peft.method=lora or prompt_tuning")
        checkpointing = False
        notes.append("prefix_tuning: no gradient checkpointing (the prefix would be dropped on recompute)")
    attention = "eager" if (getattr(cfg.model, "attn_implementation", None) or "sdpa") == "eager" else "sdpa"
    training = cfg.training or {}
    if training.get("torch_compile"):
        notes.append("training.torch_compile: memory planned as for eager execution (not measured compiled); "
                     "the first steps pay the compilation")
    # TRL's SFTTrainer computes the LM loss in token chunks unless told otherwise (loss_type, or Liger's own loss)
    chunked = cfg.method in ("sft", "qlora") and not training.get("use_liger_kernel") and \
        training.get("loss_type", "chunked_nll") in (None, "chunked_nll")
    # PPO/GRPO train on prompt + sampled answer: data.max_length bounds the prompt, the section the answer.
    generated = generated_tokens(cfg)
    seq_len = cfg.data.max_length + generated
    if generated:
        notes.append(f"{cfg.method}: sequences of up to {seq_len} tokens = prompt (data.max_length "
                     f"{cfg.data.max_length}) + {generated} generated")
    if cfg.method == "ppo":
        notes.append("ppo: activations include TRL's fp32 logits of every sampled token of the rank's rollout batch "
                     "(kept through each update; three copies while the next rollout is sampled)")
    request = PlanRequest(
        shape=shape, method=method, seq_len=seq_len, global_batch_size=plan_cfg.global_batch_size,
        lora_r=cfg.peft.r, lora_targets=cfg.peft.target_modules, trainable_params=trainable,
        optimizer=training.get("optim") or default_optimizer(), zero_stage=plan_cfg.zero_stage,
        offload=plan_cfg.offload, micro_batch_size=plan_cfg.micro_batch_size,
        gradient_checkpointing=checkpointing, memory_fraction=plan_cfg.memory_fraction,
        attention=attention, lora_dropout=float(cfg.peft.dropout or 0.0) if method != "full" else 0.0,
        loss_chunk_tokens=SFT_LOSS_CHUNK_TOKENS if chunked else 0, weight_dtype=cfg.model.dtype or "auto",
        logit_bytes={"dpo": DPO_LOGIT_BYTES, "grpo": GRPO_LOGIT_BYTES}.get(cfg.method),
        generated_tokens=generated, logit_tokens=generated if cfg.method == "grpo" else None,
        generates_rank_batch=cfg.method == "grpo", keeps_rollout_logits=cfg.method == "ppo",
        rollout_chunk=int(_section(cfg, "ppo").get("local_rollout_forward_batch_size") or 0),
        mini_batches=int(_section(cfg, "ppo").get("num_mini_batches") or 1) if cfg.method == "ppo" else 1,
        sequences_per_example=2 if cfg.method in ("dpo", "rm") else 1, generates=cfg.method in ("ppo", "grpo"),
        autocast=cfg.method != "ppo",
        quantized_adapter_bytes=2 if cfg.method in ("sft", "qlora", "dpo", "grpo", "rm") else 4, notes=notes)
    reference = ExtraModel("reference", shape, trainable=False, quantized=method == "qlora")
    if cfg.method == "dpo":
        request.extra_models.append(reference)
    elif cfg.method == "grpo":
        if grpo_beta(cfg) > 0:
            request.extra_models.append(reference)
        for name in grpo_reward_models(cfg):  # run by a reward function on every rank, outside DeepSpeed
            reward = _side_shape(name, shape, "reward", notes)
            request.extra_models.append(ExtraModel("reward", replace(reward, score_head=True), replicated=True))
    elif cfg.method == "ppo":
        ppo = _section(cfg, "ppo")
        reward = _side_shape(ppo.get("reward_model"), shape, "reward", notes)
        value = _side_shape(ppo.get("value_model") or ppo.get("reward_model"), shape, "value", notes)
        request.extra_models += [reference, ExtraModel("reward", replace(reward, score_head=True)),
                                 ExtraModel("value", replace(value, score_head=True), trainable=True)]
    return request


def default_optimizer() -> str:
    """What the HF Trainer uses when training.optim is not set: adamw_torch_fused with torch >= 2.8, else adamw_torch
    (TrainingArguments.optim). Read from the installed torch's version, without importing it."""
    from importlib import metadata

    try:
        major, minor = (int(x) for x in metadata.version("torch").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return "adamw_torch_fused"
    return "adamw_torch_fused" if (major, minor) >= (2, 8) else "adamw_torch"


def generated_tokens(cfg) -> int:
    """New tokens per rollout: grpo.max_completion_length / ppo.response_length, default eval.max_new_tokens. The
    recipes (recipes/grpo.py, recipes/ppo.py) read it here, so the trainer samples what the planner sized."""
    key = {"grpo": "max_completion_length", "ppo": "response_length"}.get(cfg.method)
    if key is None:
        return 0
    return int(_section(cfg, cfg.method).get(key, cfg.eval.max_new_tokens))


def grpo_beta(cfg) -> float:
    """GRPO's KL coefficient, default 0 (TRL's): above 0 a reference model is loaded, which the planner counts."""
    return float(_section(cfg, "grpo").get("beta", 0.0) or 0.0)


def grpo_reward_models(cfg) -> list[str]:
    """The grpo.reward entries that are models (a directory or hub id), not reward functions."""
    names = _section(cfg, "grpo").get("reward", "arith")
    names = names if isinstance(names, list) else [names]
    return [n for n in names if isinstance(n, str) and n not in REWARD_FUNCTIONS]


def _section(cfg, name: str) -> dict:
    try:
        section = getattr(cfg, name)
    except AttributeError:
        return {}
    return dict(vars(section)) if not isinstance(section, dict) else dict(section)


def _side_shape(name: Optional[str], policy: ModelShape, role: str, notes: list) -> ModelShape:
    """Reward/value models are often produced by an earlier pipeline stage: plan with the policy's shape then."""
    if not name:
        return policy
    try:
        return resolve_shape(name)
    except UserError:
        notes.append(f"{role} model '{name}' not found offline (not trained yet?); assumed the policy's shape")
        return policy
