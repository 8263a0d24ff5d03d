"""The generated DeepSpeed JSON validates with DeepSpeed's own config classes and agrees with the
TrainingArguments values HF checks it against."""
from __future__ import annotations

import dataclasses
import types
import warnings

import pytest

from launcher.ds_config import deepspeed_config, training_args_overrides
from launcher.inventory import parse_spec
from launcher.planner import PlanRequest, estimate, plan
from launcher.shapes import resolve_shape

# (model, method, inventory, global batch, pins) -> plans covering every stage, offload, precision and hpZ
CASES = [
    ("qwen2.5-0.5b", "full", "1xRTX4090", 16, {}),
    ("llama-2-7b", "qlora", "1xRTX3090-24GB", 16, dict(optimizer="paged_adamw_8bit")),
    ("llama-2-7b", "full", "8xA100-80GB", 64, dict(zero_stage=1, offload="optimizer")),
    ("llama-2-7b", "full", "8xA100-80GB", 64, dict(zero_stage=2)),
    ("llama-2-7b", "full", "8xA100-40GB", 64, dict(zero_stage=3)),
    ("llama-2-7b", "full", "8xV100-32GB", 64, dict(zero_stage=3)),
    ("llama-2-13b", "full", "8xA100-40GB", 64, dict(zero_stage=3, offload="all")),
    ("llama-2-13b", "full", "4x8xH100-80GB", 128, dict(zero_stage=3, offload="none")),
    ("llama-2-70b", "qlora", "2xA100-80GB", 16, dict(zero_stage=3)),
    ("tiny", "lora", "2xcpu", 32, dict(zero_stage=2)),
]


def make_plan(model, method, spec, batch, pins):
    p = plan(PlanRequest(method=method, seq_len=2048, global_batch_size=batch, **pins), parse_spec(spec),
             resolve_shape(model))
    assert p.fits, p.reason
    return p


@pytest.fixture(params=CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[4]}" for c in CASES])
def case_plan(request):
    return make_plan(*request.param)


def test_explicit_numbers_only(case_plan):
    ds = deepspeed_config(case_plan)

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        else:
            assert node != "auto"

    walk(ds)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] \
        * case_plan.world_size == case_plan.global_batch_size
    assert ds["zero_optimization"]["stage"] == case_plan.zero_stage
    assert ds["bf16"]["enabled"] == (case_plan.precision == "bf16")
    assert ds["fp16"]["enabled"] == (case_plan.precision == "fp16")
    if case_plan.zero_stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in ds["zero_optimization"]) == case_plan.offload_optimizer
    assert ("offload_param" in ds["zero_optimization"]) == case_plan.offload_param
    assert ds.get("zero_force_ds_cpu_optimizer", True) == (not case_plan.offload_optimizer)


def test_validates_with_deepspeed(case_plan, monkeypatch):
    """DeepSpeed's own parser, with the plan's world size as the data-parallel size."""
    import deepspeed.runtime.config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)
    mpu = types.SimpleNamespace(get_data_parallel_world_size=lambda: case_plan.world_size)
    parsed = DeepSpeedConfig(deepspeed_config(case_plan), mpu=mpu)
    assert parsed.world_size == case_plan.world_size
    assert parsed.train_batch_size == case_plan.global_batch_size
    assert parsed.zero_optimization_stage == case_plan.zero_stage
    assert parsed.zero_enabled == (case_plan.zero_stage > 0)
    assert parsed.bfloat16_config.enabled == (case_plan.precision == "bf16")
    assert parsed.float16_config.enabled == (case_plan.precision == "fp16")
    if case_plan.precision == "fp16":
        assert parsed.float16_config.loss_scale == 0  # 0 = dynamic loss scaling
    zero = parsed.zero_config
    assert (zero.offload_optimizer is not None) == case_plan.offload_optimizer
    assert (zero.offload_param is not None) == case_plan.offload_param
    if case_plan.zero_hpz_partition_size:
        assert zero.zero_hpz_partition_size == case_plan.zero_hpz_partition_size
    assert parsed.zero_force_ds_cpu_optimizer == (not case_plan.offload_optimizer)


def hf_args(plan_, overrides):
    values = dict(world_size=plan_.world_size, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999,
                  adam_epsilon=1e-8, weight_decay=0.0, save_on_each_node=False, fp16_full_eval=False,
                  bf16_full_eval=False, get_warmup_steps=lambda steps: 0)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_hf_trainer_sees_no_mismatch(case_plan):
    """transformers compares every non-"auto" value with TrainingArguments and raises on a mismatch."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    try:
        hf = HfTrainerDeepSpeedConfig(deepspeed_config(case_plan))
        hf.trainer_config_process(hf_args(case_plan, training_args_overrides(case_plan)))
        assert hf.mismatches == []
        model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=case_plan.hidden_size))
        hf.trainer_config_finalize(hf_args(case_plan, training_args_overrides(case_plan)), model, 100)
        assert hf.is_zero3() == (case_plan.zero_stage == 3)
        # accelerate only reports offload for ZeRO-2/3 (ZeRO-1 offload is valid DeepSpeed, just not flagged there)
        assert hf.is_offload() == (case_plan.offload_optimizer and case_plan.zero_stage >= 2)
        # and a wrong value is caught, so the check above means something
        wrong = dict(training_args_overrides(case_plan), gradient_accumulation_steps=7)
        hf2 = HfTrainerDeepSpeedConfig(deepspeed_config(case_plan))
        hf2.trainer_config_process(hf_args(case_plan, wrong))
        assert hf2.mismatches
    finally:
        unset_hf_deepspeed_config()


def test_training_args_overrides_match_plan():
    p = make_plan("llama-2-7b", "full", "8xV100-32GB", 64, dict(zero_stage=3))
    kw = training_args_overrides(p, gradient_clipping=0.5)
    assert kw == {"per_device_train_batch_size": p.micro_batch_size,
                  "gradient_accumulation_steps": p.gradient_accumulation_steps,
                  "gradient_checkpointing": p.gradient_checkpointing, "bf16": False, "fp16": True,
                  "max_grad_norm": 0.5}
    assert deepspeed_config(p, gradient_clipping=0.5)["gradient_clipping"] == 0.5


def test_real_training_arguments_accept_the_config(tmp_path):
    """A real TrainingArguments (CPU, one process) builds with the generated config and our overrides."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from recipes.common import _checkpointing_names

    p = make_plan("tiny", "lora", "cpu", 32, dict(zero_stage=2, gradient_checkpointing=True))
    try:
        with warnings.catch_warnings(record=True) as caught:  # the names the installed transformers reads
            warnings.simplefilter("always")
            args = TrainingArguments(output_dir=str(tmp_path), deepspeed=deepspeed_config(p), use_cpu=True,
                                     report_to=[], **_checkpointing_names(training_args_overrides(p)))
        assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
        assert args.gradient_checkpointing is True
        assert args.hf_deepspeed_config.mismatches == []
        assert args.hf_deepspeed_config.config["train_batch_size"] == 32
    finally:
        unset_hf_deepspeed_config()


def test_recipe_max_grad_norm_reaches_both_configs(tmp_path):
    """training.max_grad_norm in a recipe: the runner's DeepSpeed JSON and the recipe's TrainingArguments agree
    (HF compares gradient_clipping with max_grad_norm and refuses to start on a mismatch); nonsense is one line."""
    from launcher.config import load_recipe
    from launcher.ds_config import gradient_clipping
    from launcher.errors import UserError
    from launcher.train import DistEnv, RunContext
    from recipes.common import training_kwargs

    p = make_plan("tiny", "lora", "cpu", 32, dict(zero_stage=2))
    cfg = load_recipe("lora_tiny", overrides=["training.max_grad_norm=0.3"])
    ds = deepspeed_config(p, gradient_clipping(cfg))
    ctx = RunContext(cfg=cfg, plan=p, env=DistEnv(), ds_config=ds, output_dir=tmp_path)
    kw = training_kwargs(ctx)
    assert ds["gradient_clipping"] == kw["max_grad_norm"] == 0.3
    with pytest.raises(UserError, match="training.max_grad_norm"):
        gradient_clipping(load_recipe("lora_tiny", overrides=["training.max_grad_norm=lots"]))


@pytest.mark.parametrize("recipe, spec, before, after", [
    ("qlora_7b", "1xRTX3090-24GB", (0, 8, True), (0, 2, False)),
    ("sft_7b", "8xA100-40GB", (2, 8, True), (2, 2, False)),
])
def test_plan_fitted_to_the_longest_row_keeps_stage_and_config_in_step(recipe, spec, before, after, tmp_path):
    """A run whose rows are all shorter than data.max_length plans again for the longest (each micro-batch is padded
    to its own longest row): the freed activation memory goes to a larger micro-batch or no recompute, the stage
    stays, and the DeepSpeed JSON follows the new plan (keeping this start's one-off resume switch)."""
    from launcher.config import load_recipe
    from launcher.recipe_request import request_from_recipe
    from launcher.train import DistEnv, PlanInputs, RunContext

    cfg = load_recipe(recipe, None, [])
    request = request_from_recipe(cfg)
    request.deepspeed = True
    inventory = parse_spec(spec)
    first = plan(request, inventory)
    ds = {**deepspeed_config(first), "checkpoint": {"load_universal": True}}
    ctx = RunContext(cfg=cfg, plan=first, env=DistEnv(), ds_config=ds, output_dir=tmp_path,
                     planned_from=PlanInputs(request, inventory))
    ctx.fit_plan_to_rows(2048)  # as long as data.max_length: nothing to fit
    assert ctx.plan is first and ctx.ds_config is ds and not ctx.start_notes
    ctx.fit_plan_to_rows(512)
    fitted = ctx.plan
    ctx.fit_plan_to_rows(512)  # again: the same plan (from the same first request), nothing new to say
    assert ctx.plan == fitted and len(ctx.start_notes) == 1
    assert (first.zero_stage, first.micro_batch_size, first.gradient_checkpointing) == before
    assert (fitted.zero_stage, fitted.micro_batch_size, fitted.gradient_checkpointing) == after
    assert fitted.seq_len == 512 and fitted.fits and any("longest row is 512 tokens" in r for r in fitted.reasons)
    # the recipe pinned nothing: the reasons say the stage was kept, not that the user pinned it
    assert f"kept, not pinned (see above): plan.zero_stage={before[0]}, plan.offload=none" in fitted.reasons
    assert not any(r.startswith("pinned:") for r in fitted.reasons)
    # faster than the first plan's choices would run these rows
    kept = estimate(dataclasses.replace(request, seq_len=512), inventory, request.shape, zero_stage=first.zero_stage,
                    offload=first.offload, gradient_checkpointing=first.gradient_checkpointing,
                    micro_batch_size=first.micro_batch_size)
    assert fitted.predicted_step_seconds < kept["step_seconds"] * 0.99
    assert ctx.ds_config == {**deepspeed_config(fitted), "checkpoint": {"load_universal": True}}
    assert ctx.start_notes == [f"planned for rows of at most 512 tokens (the data's longest; data.max_length 2048): "
                               f"micro-batch {before[1]} -> {after[1]}"
                               + (", checkpointing on -> off" if before[2] != after[2] else "")]
