"""The DeepSpeed JSON a Plan implies, and the TrainingArguments values that agree with it. Pure; no torch.

Explicit numbers only (no "auto"): the file in ds_configs/ is then exactly what ran, and HF's consistency check
(`HfTrainerDeepSpeedConfig.trainer_config_process`) compares our numbers with TrainingArguments instead of
filling them in. tests/test_ds_config.py validates the output with DeepSpeed's own config classes.
"""
from __future__ import annotations

from launcher import memory as mem

STEPS_PER_PRINT = 1_000_000  # HF's logging does the talking; DeepSpeed's own step prints only add noise


def gradient_clipping(cfg) -> float:
    """training.max_grad_norm (HF's default 1.0): the DeepSpeed JSON must say the same, or HF refuses to start."""
    from launcher.errors import UserError

    value = cfg.training.get("max_grad_norm", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"training.max_grad_norm: must be a number >= 0 (0 turns clipping off), got {value!r}")
    return float(value)


def deepspeed_config(plan, gradient_clipping: float = 1.0) -> dict:
    """ZeRO stage, offload, batch geometry and precision of `plan` as a DeepSpeed config dict."""
    hidden = int(plan.hidden_size or 4096)  # a plan read back from an older JSON may lack these two
    bucket = int(plan.bucket_elements or mem.bucket_elements(hidden))
    zero: dict = {"stage": plan.zero_stage}
    if plan.zero_stage >= 1:
        zero.update(overlap_comm=plan.world_size > 1, contiguous_gradients=True, reduce_bucket_size=bucket)
    if plan.zero_stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=bucket, reduce_scatter=True)
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * bucket),
            stage3_param_persistence_threshold=10 * hidden,  # HF's "auto" rule: small params stay resident
            # what the planner charges for (memory.zero3_gathered_bytes)
            stage3_max_live_parameters=mem.STAGE3_REUSE_NUMEL,
            stage3_max_reuse_distance=mem.STAGE3_REUSE_NUMEL,
            # save_model() then writes a full 16-bit model.safetensors instead of only ZeRO shards.
            stage3_gather_16bit_weights_on_model_save=True,
        )
        if plan.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if plan.zero_hpz_partition_size:
            zero["zero_hpz_partition_size"] = int(plan.zero_hpz_partition_size)
    config = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.micro_batch_size * plan.gradient_accumulation_steps * plan.world_size,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if plan.precision == "fp16":
        # Dynamic loss scaling: start at 2^16, halve on overflow, grow again after 1000 clean steps.
        config["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2,
                              min_loss_scale=1)
    if plan.offload_optimizer:
        # HF builds a torch optimizer (no "optimizer" section here); DeepSpeed refuses such a client optimizer
        # under ZeRO-Offload unless told otherwise (engine._configure_optimizer raises ZeRORuntimeException).
        config["zero_force_ds_cpu_optimizer"] = False
    return config


# Batch geometry and precision come from the plan; a recipe's `training:` section may not contradict it.
PLAN_OWNED = {"per_device_train_batch_size": "plan.micro_batch_size",
              "gradient_accumulation_steps": "plan.global_batch_size (accumulation is derived)",
              "gradient_checkpointing": "plan.gradient_checkpointing",
              "activation_checkpointing": "plan.gradient_checkpointing", "deepspeed": "the planner (generated)",
              "bf16": "the planner (precision)", "fp16": "the planner (precision)", "output_dir": "output_dir",
              "seed": "seed", "use_cpu": "the planner (device)"}


def check_plan_owned(training: dict) -> None:
    """A recipe's `training:` may not contradict the plan (both `ftlaunch plan` and `run` load recipes through this)."""
    from launcher.errors import UserError

    for key in training:
        if key in PLAN_OWNED:
            raise UserError(f"training.{key}: set by {PLAN_OWNED[key]}, not in training:; remove it")


def training_args_overrides(plan, gradient_clipping: float = 1.0) -> dict:
    """TrainingArguments values that match `deepspeed_config(plan)` (HF raises on any mismatch)."""
    return {
        "per_device_train_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        "max_grad_norm": gradient_clipping,
    }
