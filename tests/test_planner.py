"""Planner decisions on a table of real-world scenarios, properties of the memory model, and agreement with
DeepSpeed's own model-state estimators. Pure and fast: no torch, no GPU."""
from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher import memory as mem
from launcher.ds_config import deepspeed_config
from launcher.errors import UserError
from launcher.inventory import parse_spec
from launcher.planner import ExtraModel, PlanRequest, estimate, plan
from launcher.recipe_request import request_from_recipe
from launcher.shapes import resolve_shape

REPO = Path(__file__).resolve().parent.parent
GiB = mem.GiB


def run(model, method, spec, seq=2048, batch=16, **kw):
    return plan(PlanRequest(method=method, seq_len=seq, global_batch_size=batch, **kw), parse_spec(spec),
                resolve_shape(model))


def ppo_extras(model):
    shape = resolve_shape(model)
    return [ExtraModel("reference", shape), ExtraModel("reward", shape), ExtraModel("value", shape, trainable=True)]


def fits_on_gpu_alone(p):
    return p.fits and not p.offload_optimizer and not p.offload_param


def refused_or_offloaded(p):
    return (not p.fits) or p.offload_optimizer or p.offload_param


QLORA = dict(lora_r=64, optimizer="paged_adamw_8bit")

# (id, model, method, inventory, seq, global batch, extra request fields, check)
SCENARIOS = [
    ("qlora-7b-3090", "meta-llama/Llama-2-7b-hf", "qlora", "1xRTX3090-24GB", 2048, 16, QLORA, fits_on_gpu_alone),
    ("qlora-7b-4090", "meta-llama/Llama-2-7b-hf", "qlora", "1xRTX4090", 2048, 16, QLORA, fits_on_gpu_alone),
    ("qlora-7b-t4-fp16", "llama-2-7b", "qlora", "1xT4", 1024, 16, QLORA,
     lambda p: p.fits and p.precision == "fp16"),
    ("qlora-8b-l4", "meta-llama/Meta-Llama-3-8B", "qlora", "1xL4", 2048, 16, QLORA, fits_on_gpu_alone),
    ("qlora-70b-a100-80", "llama-2-70b", "qlora", "1xA100-80GB", 2048, 16, QLORA, fits_on_gpu_alone),
    ("qlora-70b-3090-refused", "llama-2-70b", "qlora", "1xRTX3090-24GB", 2048, 16, QLORA,
     lambda p: not p.fits and "short by" in p.reason),
    ("qlora-14b-4090-seq1024", "qwen2.5-14b", "qlora", "1xRTX4090", 1024, 16, QLORA, fits_on_gpu_alone),
    ("qlora-32b-a100-40", "qwen2.5-32b", "qlora", "1xA100-40GB", 2048, 16, QLORA, fits_on_gpu_alone),
    ("qlora-72b-2xa100-zero3", "qwen2.5-72b", "qlora", "2xA100-80GB", 2048, 16, dict(QLORA, zero_stage=3),
     lambda p: p.fits and p.bnb_4bit_quant_storage == "bfloat16"),
    ("lora-7b-3090", "llama-2-7b", "lora", "1xRTX3090-24GB", 2048, 16, {}, lambda p: p.fits),
    ("lora-7b-a10", "Qwen/Qwen2.5-7B-Instruct", "lora", "1xA10", 1024, 16, {}, lambda p: p.fits),
    ("lora-13b-a100-40", "llama-2-13b", "lora", "1xA100-40GB", 2048, 16, {}, fits_on_gpu_alone),
    ("lora-70b-8xa100-40-zero3", "llama-2-70b", "lora", "8xA100-40GB", 2048, 16, {},
     lambda p: p.fits and p.zero_stage == 3 and p.models["policy"]["frozen_base"].startswith("partitioned")),
    ("lora-70b-8xa100-80-zero3", "meta-llama/Llama-3.1-70B-Instruct", "lora", "8xA100-80GB", 2048, 16, {},
     lambda p: p.fits and p.zero_stage == 3),
    ("lora-smol-l4", "HuggingFaceTB/SmolLM2-135M-Instruct", "lora", "1xL4", 2048, 16, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 0),
    ("full-7b-3090-never-gpu-alone", "meta-llama/Llama-2-7b-hf", "full", "1xRTX3090-24GB", 2048, 16, {},
     refused_or_offloaded),
    # one process, no DeepSpeed: the bf16 weights train as they are (2 + 2 + 4 B/param with AdamW), which fits;
    # fp32 weights (16 B/param) do not without offload
    ("full-7b-a100-80-single", "llama-2-7b", "full", "1xA100-80GB", 2048, 16, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 0 and any("in bfloat16" in r for r in p.reasons)),
    ("full-7b-a100-80-single-fp32", "llama-2-7b", "full", "1xA100-80GB", 2048, 16, {"weight_dtype": "float32"},
     refused_or_offloaded),
    ("full-7b-8xa100-80", "llama-2-7b", "full", "8xA100-80GB", 2048, 64, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage >= 1),
    ("full-7b-8xa100-40-zero3", "llama-2-7b", "full", "8xA100-40GB", 2048, 64, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 3),
    ("full-7b-8xv100-fp16", "llama-2-7b", "full", "8xV100-32GB", 2048, 64, {},
     lambda p: p.fits and p.precision == "fp16"),
    ("full-mistral-8xh100-seq4096", "mistralai/Mistral-7B-v0.1", "full", "8xH100-80GB", 4096, 64, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage >= 1),  # ZeRO-1: bf16 grads whole, fp32 ones only in the step
    ("full-13b-2x8xa100-40", "llama-2-13b", "full", "2x8xA100-40GB", 2048, 64, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 3),
    ("full-70b-4x8xa100-80-zero3", "llama-2-70b", "full", "4x8xA100-80GB", 2048, 64, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 3),
    ("full-70b-8xa100-80-short", "llama-2-70b", "full", "8xA100-80GB", 2048, 64, {}, refused_or_offloaded),
    ("full-72b-4x8xh100-zero3", "qwen2.5-72b", "full", "4x8xH100-80GB", 4096, 128, {},
     lambda p: p.fits and p.zero_stage == 3),  # with or without optimizer offload: the cost model's call
    ("full-405b-64x8xh100", "llama-3.1-405b", "full", "64x8xH100-80GB", 2048, 1024, {},
     lambda p: p.fits and p.zero_stage == 3 and p.nodes == 64),
    ("full-0.5b-4090", "qwen2.5-0.5b", "full", "1xRTX4090", 2048, 16, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 0),
    ("full-0.5b-t4-fp16", "Qwen/Qwen2.5-0.5B", "full", "1xT4", 1024, 16, {},
     lambda p: p.fits and p.precision == "fp16"),
    ("full-1.5b-2x4090", "qwen2.5-1.5b", "full", "2xRTX4090", 2048, 16, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage >= 1),
    ("full-smol1.7b-3090", "smollm2-1.7b", "full", "1xRTX3090-24GB", 2048, 16, {},
     lambda p: fits_on_gpu_alone(p) and p.zero_stage == 0),  # bf16 weights as loaded: 8 B/param
    ("full-smol1.7b-3090-fp32", "smollm2-1.7b", "full", "1xRTX3090-24GB", 2048, 16, {"weight_dtype": "float32"},
     refused_or_offloaded),
    ("full-8b-seq64k-refused", "meta-llama/Meta-Llama-3-8B", "full", "8xH100-80GB", 65536, 8, {},
     lambda p: not p.fits and "data.max_length=" in p.reason),
    ("full-3b-h100", "qwen2.5-3b", "full", "1xH100", 2048, 16, {}, fits_on_gpu_alone),
    ("full-8b-2x8xa100-hpz", "llama-3-8b", "full", "2x8xA100-40GB", 2048, 64, dict(zero_stage=3),
     lambda p: p.fits and p.zero_stage == 3),
    ("full-tiny-cpu", "tiny", "full", "cpu", 32, 32, {},
     lambda p: p.fits and p.device == "cpu" and p.precision == "fp32"),
    ("lora-tiny-2xcpu", "tiny", "lora", "2xcpu", 32, 32, {},
     lambda p: p.fits and p.world_size == 2 and p.micro_batch_size * p.gradient_accumulation_steps == 16),
    ("ppo-7b-8xa100-80", "llama-2-7b", "full", "8xA100-80GB", 1024, 64,
     dict(extra_models=ppo_extras("llama-2-7b"), generates=True),
     lambda p: p.fits and set(p.models) == {"policy", "value", "reference", "reward"}
     and p.models["value"]["optimizer"] > 0 and p.models["reward"]["optimizer"] == 0),
    ("ppo-7b-lora-reference-free", "llama-2-7b", "lora", "8xA100-80GB", 1024, 64,
     dict(extra_models=ppo_extras("llama-2-7b"), generates=True),
     lambda p: p.fits and p.models["reference"]["weights"] == 0),
    ("dpo-7b-8xa100-80", "llama-2-7b", "full", "8xA100-80GB", 1024, 64,
     dict(extra_models=[ExtraModel("reference", resolve_shape("llama-2-7b"))], sequences_per_example=2),
     lambda p: p.fits and p.models["reference"]["trainable_params"] == 0),
    ("pinned-zero0-refused", "llama-2-7b", "full", "8xA100-80GB", 2048, 64, dict(zero_stage=0),
     lambda p: not p.fits and "pinned" in p.reason and "without the pins" in p.reason
     and p.per_gpu_bytes["total"] > p.usable_bytes),
    ("pinned-micro-batch", "llama-2-7b", "qlora", "1xA100-80GB", 2048, 32, dict(QLORA, micro_batch_size=4),
     lambda p: p.fits and p.micro_batch_size == 4 and p.gradient_accumulation_steps == 8),
    ("pinned-no-checkpointing", "smollm2-360m", "full", "1xA100-80GB", 2048, 16,
     dict(gradient_checkpointing=False), lambda p: p.fits and p.gradient_checkpointing is False),
]


@pytest.mark.parametrize("name,model,method,spec,seq,batch,extra,check", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(name, model, method, spec, seq, batch, extra, check):
    p = run(model, method, spec, seq, batch, **extra)
    assert check(p), f"{name}: {p.reason}\n{p.to_json()['per_gpu_bytes']}"
    assert p.micro_batch_size * p.gradient_accumulation_steps * p.world_size == batch
    if p.fits:
        assert p.per_gpu_bytes["total"] <= p.usable_bytes
        assert p.reasons and all(isinstance(r, str) for r in p.reasons)


def test_plan_json_contract():
    p = run("llama-2-7b", "qlora", "1xRTX3090-24GB", **QLORA)
    data = p.to_json()
    for key in ("fits", "zero_stage", "offload_optimizer", "offload_param", "micro_batch_size",
                "gradient_accumulation_steps", "gradient_checkpointing", "precision", "per_gpu_bytes",
                "capacity_bytes", "rejected", "reasons", "world_size", "nodes", "gpus_per_node", "device", "method",
                "seq_len", "global_batch_size", "host_bytes_per_node", "models"):
        assert key in data, key
    assert set(data["per_gpu_bytes"]) == {"weights", "gradients", "optimizer", "activations", "other", "total"}
    assert data["per_gpu_bytes"]["total"] == sum(v for k, v in data["per_gpu_bytes"].items() if k != "total")
    assert data["rejected"] and all(set(r) == {"plan", "reason"} and r["reason"] for r in data["rejected"])
    import json

    json.dumps(data)


def test_no_fit_reason_says_by_how_much_and_what_would():
    p = run("llama-2-13b", "full", "1xRTX3090-24GB", optimizer="paged_adamw_8bit")
    assert not p.fits
    assert "short by" in p.reason and "would fit" in p.reason and "QLoRA instead of full" in p.reason
    assert p.per_gpu_bytes["total"] > p.usable_bytes  # the breakdown shown is the closest miss


def test_lora_suggests_qlora():
    p = run("llama-2-13b", "lora", "1xRTX3090-24GB", seq=512, batch=16, optimizer="paged_adamw_8bit")
    assert not p.fits
    assert "QLoRA instead of lora" in p.reason


def test_global_batch_not_divisible():
    with pytest.raises(UserError, match="plan.global_batch_size=10"):
        run("llama-2-7b", "full", "4xA100-80GB", batch=10)


@pytest.mark.parametrize("pins,match", [
    (dict(offload="all", zero_stage=2), "needs ZeRO-3"),
    (dict(offload="optimizer", zero_stage=0), "ZeRO-1 or higher"),
    (dict(micro_batch_size=3), "plan.micro_batch_size=3"),
    (dict(zero_stage=5), "plan.zero_stage=5"),
    (dict(offload="sometimes"), "plan.offload=sometimes"),
])
def test_bad_pins(pins, match):
    with pytest.raises(UserError, match=match):
        run("llama-2-7b", "full", "8xA100-80GB", batch=64, **pins)


def test_offload_needs_cpu_capable_optimizer():
    p = run("llama-2-7b", "full", "1xRTX3090-24GB", optimizer="paged_adamw_8bit")
    assert not p.offload_optimizer
    assert any("bitsandbytes" in r["reason"] for r in p.rejected)


def test_multi_node_zero3_uses_hpz_when_it_pays():
    """Across nodes ZeRO++'s hpZ (a secondary copy of the weights inside each node) trades memory for inter-node
    traffic: chosen where it is predicted faster, the same configuration without it rejected as slower; on one
    node it is never a candidate."""
    p = run("llama-2-13b", "full", "4x8xH100-80GB", batch=128, zero_stage=3)
    assert p.fits and p.zero_hpz_partition_size == 8
    same = {"zero_stage": 3, "offload": p.offload, "gradient_checkpointing": p.gradient_checkpointing,
            "micro_batch_size": p.micro_batch_size}
    without = [r for r in p.rejected if r["plan"] == same]
    assert len(without) == 1 and without[0]["reason"].startswith("slower"), without
    one_node = run("llama-2-13b", "full", "1x8xH100-80GB", batch=128, zero_stage=3)
    assert one_node.zero_hpz_partition_size is None
    assert not any(r["plan"].get("zero_hpz") for r in one_node.rejected)


# ---------------------------------------------------------------- properties

CARD_NAMES = ["qwen2.5-0.5b", "smollm2-360m", "qwen2.5-1.5b", "llama-2-7b", "llama-3-8b", "llama-2-13b"]


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(CARD_NAMES), method=st.sampled_from(["full", "lora", "qlora"]),
       gpus=st.sampled_from([1, 2, 4, 8]), small=st.integers(8, 80), extra=st.integers(0, 80),
       seq=st.sampled_from([256, 1024, 2048, 4096]))
def test_more_memory_never_predicted_slower(model, method, gpus, small, extra, seq):
    request = PlanRequest(method=method, seq_len=seq, global_batch_size=16 * gpus)
    shape = resolve_shape(model)
    host = 512 * GiB
    low = plan(request, parse_spec(f"{gpus}xA100-{small}GB", host), shape, suggest=False)
    high = plan(request, parse_spec(f"{gpus}xA100-{small + extra}GB", host), shape, suggest=False)
    if low.fits:
        assert high.fits
        assert high.predicted_step_seconds <= low.predicted_step_seconds + 1e-9


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(CARD_NAMES), method=st.sampled_from(["full", "lora", "qlora"]),
       stage=st.sampled_from([0, 1, 2, 3]), offload=st.sampled_from(["none", "optimizer", "all"]),
       checkpointing=st.booleans(), attention=st.sampled_from(["sdpa", "eager"]),
       seq=st.integers(16, 8192), extra_seq=st.integers(0, 4096), micro_exp=st.integers(0, 5))
def test_peak_monotonic_in_seq_len_and_micro_batch(model, method, stage, offload, checkpointing, attention, seq,
                                                     extra_seq, micro_exp):
    if (offload == "all" and stage != 3) or (offload == "optimizer" and stage == 0):
        return
    shape = resolve_shape(model)
    inventory = parse_spec("8xA100-80GB")
    micro = 2 ** micro_exp

    def peak(s, m):
        request = PlanRequest(method=method, seq_len=s, global_batch_size=8 * 64, attention=attention)
        return estimate(request, inventory, shape, zero_stage=stage, offload=offload,
                        gradient_checkpointing=checkpointing, micro_batch_size=m)["per_gpu_bytes"]["total"]

    base = peak(seq, micro)
    assert peak(seq + extra_seq, micro) >= base
    assert peak(seq, micro * 2) >= base


# ---------------------------------------------------------------- DeepSpeed's estimators

@pytest.fixture(scope="module")
def ds_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def full_states(shape, stage, nodes, gpus, offload):
    """GPU bytes of a full fine-tune's model states in the optimizer step, the moment DeepSpeed's estimators describe
    (fp32 gradients included), where the estimators simplify the code they estimate: ZeRO-3 keeps a 16-bit gradient
    partition (stage3.py grad_partitions_flat_buffer) and makes fp32 gradients one sub-group (1e9) at a time."""
    dp, n = nodes * gpus, shape.num_params
    s = mem.model_states(trainable=n, frozen_bytes=0, precision="bf16", state_bytes=8, zero_stage=stage,
                         dp=dp, offload_optimizer=offload != "none", offload_param=offload == "all",
                         largest_layer=shape.largest_layer_params if stage == 3 else 0)
    simplified = 0.0
    if stage == 3 and offload == "none":
        simplified = 4 * max(0.0, n / dp - mem.STAGE3_SUB_GROUP_NUMEL) - 2 * n / dp
    return s.weights + s.gradients + s.optimizer + s.step_gradients + simplified


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama-2-7b", "llama-3-8b", "llama-2-70b"])
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 2), (1, 8), (2, 8), (4, 8)])
def test_zero2_gpu_agrees_with_deepspeed(ds_estimators, model, nodes, gpus):
    zero2, _ = ds_estimators
    shape = resolve_shape(model)
    for offload in (False, True):
        _, ds_gpu = zero2(shape.num_params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload)
        ours = full_states(shape, 2, nodes, gpus, "optimizer" if offload else "none")
        assert ours == pytest.approx(ds_gpu, rel=1e-6, abs=64)


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama-2-7b", "llama-3-8b", "llama-2-70b"])
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 2), (1, 8), (2, 8), (4, 8)])
@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_zero3_gpu_agrees_with_deepspeed(ds_estimators, model, nodes, gpus, offload):
    _, zero3 = ds_estimators
    shape = resolve_shape(model)
    _, ds_gpu, _ = zero3(shape.num_params, shape.largest_layer_params, num_gpus_per_node=gpus, num_nodes=nodes,
                         cpu_offload=offload != "none", cpu_offload_params=offload == "all")
    assert full_states(shape, 3, nodes, gpus, offload) == pytest.approx(ds_gpu, rel=1e-6, abs=64)


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 4), (2, 8)])
@pytest.mark.parametrize("offload", ["optimizer", "all"])
def test_offloaded_host_bytes_agree_with_deepspeed(ds_estimators, nodes, gpus, offload):
    """Host side of ZeRO-3 offload with zero.Init (what HF uses): DeepSpeed's cpu_mem per node."""
    zero2, zero3 = ds_estimators
    shape = resolve_shape("llama-2-7b")
    ds_cpu, _, _ = zero3(shape.num_params, shape.largest_layer_params, num_gpus_per_node=gpus, num_nodes=nodes,
                         cpu_offload=True, cpu_offload_params=offload == "all")
    states = mem.model_states(trainable=shape.num_params, frozen_bytes=0, precision="bf16", state_bytes=8,
                              zero_stage=3, dp=nodes * gpus, offload_optimizer=True, offload_param=offload == "all",
                              largest_layer=shape.largest_layer_params)
    assert states.host * gpus * mem.OFFLOAD_BUFFER_FACTOR == pytest.approx(ds_cpu, rel=1e-6)
    if nodes == 1 and gpus <= 4:  # ZeRO-2 offload: DeepSpeed's max(4 x GPUs, 16) bytes/param is 16 here
        ds_cpu2, _ = zero2(shape.num_params, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=True)
        states2 = mem.model_states(trainable=shape.num_params, frozen_bytes=0, precision="bf16", state_bytes=8,
                                   zero_stage=2, dp=gpus, offload_optimizer=True)
        assert states2.host * gpus * mem.OFFLOAD_BUFFER_FACTOR == pytest.approx(ds_cpu2, rel=1e-6)


# ---------------------------------------------------------------- memory pieces

def test_weight_bytes_by_storage():
    shape = resolve_shape("llama-2-7b")
    n = shape.num_params
    assert mem.frozen_weight_bytes(shape, n, 4, False) == 4 * n
    assert mem.frozen_weight_bytes(shape, n, 2, False) == 2 * n
    nf4 = mem.frozen_weight_bytes(shape, n, 2, True)
    # NF4 + double quant on the block linears; prepare_model_for_kbit_training upcasts embeddings, lm_head and
    # norms to fp32
    assert nf4 == pytest.approx(shape.layers * shape.linear_params_per_layer * 0.516
                                + (n - shape.layers * shape.linear_params_per_layer) * 4)
    assert 4.0 * GiB < nf4 < 4.5 * GiB


def test_optimizer_state_bytes():
    assert mem.optimizer_state_bytes("adamw_torch") == 8
    assert mem.optimizer_state_bytes("adamw_torch_fused") == 8
    assert mem.optimizer_state_bytes("paged_adamw_32bit") == 8
    # bitsandbytes blockwise 8-bit: a uint8 per element and state + an fp32 absmax per 256 elements and state
    assert mem.optimizer_state_bytes("adamw_8bit") == mem.optimizer_state_bytes("paged_adamw_8bit") == 2 + 8 / 256
    assert mem.optimizer_state_bytes("paged_lion_8bit") == 1 + 4 / 256


def test_8bit_optimizer_keeps_the_trained_embedding_in_32_bits():
    """HF's Trainer gives every nn.Embedding 32-bit states under a bitsandbytes 8-bit optimizer: a full fine-tune
    pays fp32 Adam states for vocab x hidden; LoRA (frozen embedding) and torch's AdamW are unchanged."""
    shape = resolve_shape("qwen2.5-0.5b")
    inv = parse_spec("1xH100-80GB")
    emb = shape.vocab * shape.hidden
    req = lambda method, optim: PlanRequest(method=method, seq_len=256, global_batch_size=2, zero_stage=0,  # noqa
                                            offload="none", micro_batch_size=2, optimizer=optim)
    full8 = plan(req("full", "adamw_8bit"), inv, shape).per_gpu_bytes["optimizer"]
    assert full8 == pytest.approx((shape.num_params - emb) * (2 + 8 / 256) + emb * 8, rel=1e-9)
    assert any("embedding of the policy (136M parameters) keeps fp32 states" in r
               for r in plan(req("full", "adamw_8bit"), inv, shape).reasons)
    for other in ("adamw_torch_8bit", "galore_adamw_8bit"):  # torchao / GaLore: no bitsandbytes override
        assert plan(req("full", other), inv, shape).per_gpu_bytes["optimizer"] == \
            pytest.approx(shape.num_params * (2 + 8 / 256))
    assert mem.with_embedding_states(mem.optimizer_state_bytes("rmsprop_bnb_8bit"), "rmsprop_bnb_8bit", 100, 10) \
        == pytest.approx((90 * (1 + 4 / 256) + 10 * 4) / 100)  # one state: 4 B in fp32
    lora8 = plan(req("lora", "adamw_8bit"), inv, shape)
    assert not any("fp32 states" in r for r in lora8.reasons)
    assert lora8.per_gpu_bytes["optimizer"] == pytest.approx(lora8.model["trainable_params"] * (2 + 8 / 256))
    engine = PlanRequest(method="full", seq_len=256, global_batch_size=2, zero_stage=2, offload="none",
                         micro_batch_size=1, optimizer="adamw_8bit")  # DeepSpeed: flat partitions, all 8-bit
    assert plan(engine, parse_spec("2xH100-80GB"), shape).per_gpu_bytes["optimizer"] == \
        pytest.approx(shape.num_params * (4 + 2 + 8 / 256) / 2)
    assert mem.with_embedding_states(8.0, "adamw_torch", 100, 10) == 8.0
    assert mem.with_embedding_states(1.0, "lion_8bit", 100, 10) == pytest.approx((90 * 1.0 + 10 * 4) / 100)


def test_lora_param_counts():
    shape = resolve_shape("llama-2-7b")
    # r=64 on q,k,v,o,gate,up,down of Llama-2-7B: 159,907,840 (PEFT's print_trainable_parameters)
    assert mem.lora_params(shape, 64, "all-linear") == 159_907_840
    assert mem.lora_params(shape, 8, ["q_proj", "v_proj"]) == 4_194_304


def test_logits_dominate_for_large_vocab():
    small = resolve_shape("llama-2-7b")  # 32k vocab
    large = resolve_shape("llama-3-8b")  # 128k vocab
    assert mem.logits_bytes(large, seq_len=4096, micro_batch=1) > 3.9 * mem.logits_bytes(small, seq_len=4096,
                                                                                           micro_batch=1)


def test_checkpointing_and_flash_reduce_activations():
    shape = resolve_shape("llama-2-7b")
    full = mem.activation_bytes(shape, seq_len=2048, micro_batch=1, checkpointing=False, attention="eager")
    sdpa = mem.activation_bytes(shape, seq_len=2048, micro_batch=1, checkpointing=False, attention="sdpa")
    ckpt = mem.activation_bytes(shape, seq_len=2048, micro_batch=1, checkpointing=True, attention="sdpa")
    assert full > sdpa > 5 * ckpt


# ---------------------------------------------------------------- recipes

def _cfg(method="sft", name="meta-llama/Llama-2-7b-hf", peft="none", load_in_4bit=False, extra=None, **plan_kw):
    ns = types.SimpleNamespace
    plan_cfg = dict(global_batch_size=16, zero_stage=None, offload=None, micro_batch_size=None,
                    gradient_checkpointing=None, memory_fraction=0.9, inventory=None)
    plan_cfg.update(plan_kw)
    cfg = ns(method=method, model=ns(name=name, tiny=None, attn_implementation="sdpa", dtype="auto"),
             peft=ns(method=peft, r=16, target_modules="all-linear", num_virtual_tokens=16, dropout=0.05),
             quant=ns(load_in_4bit=load_in_4bit), data=ns(max_length=1024), plan=ns(**plan_cfg),
             training={"optim": "paged_adamw_8bit"}, eval=ns(max_new_tokens=64))
    for key, value in (extra or {}).items():
        setattr(cfg, key, ns(**value))
    return cfg


def test_chunked_loss_logits_do_not_grow_with_the_batch():
    """TRL's chunked_nll never holds b x s x V logits: the term is set by the chunk and the lm_head weight copies."""
    shape = resolve_shape("qwen2.5-0.5b")
    whole = [mem.logits_bytes(shape, seq_len=2048, micro_batch=b) for b in (1, 8)]
    chunked = [mem.logits_bytes(shape, seq_len=2048, micro_batch=b, chunk_tokens=256) for b in (1, 8)]
    assert whole[1] == 8 * whole[0] and chunked[0] == chunked[1] < whole[0] / 3
    # bf16 forward: fp32 + bf16 copies of the V x h weight and one chunk's bf16 logits
    v, h = shape.vocab, shape.hidden
    assert chunked[0] == max(v * h * 6 + 256 * v * 2, v * h * 2 + 12 * 256 * v)
    assert mem.logits_bytes(shape, seq_len=64, micro_batch=1, precision="fp32", chunk_tokens=256) == 16 * 256 * v
    # DPO: whole logits, two sequences per example, 16 B each (fp32 logits + the backward's fp32 copies)
    assert mem.logits_bytes(shape, seq_len=512, micro_batch=2, sequences=2, per_logit=mem.DPO_LOGIT_BYTES) == \
        512 * 2 * 2 * v * 16


def test_single_process_full_finetune_trains_in_the_load_dtype():
    """No DeepSpeed, one process: HF trains the weights as loaded, so bf16 weights mean bf16 grads and AdamW states
    (2 + 2 + 4 B/param); fp16 weights load as fp32 (the grad scaler refuses fp16 gradients); DeepSpeed keeps masters."""
    shape = resolve_shape("qwen2.5-0.5b")
    n = shape.num_params
    one = parse_spec("1xA100-80GB")
    for dtype, per_param in (("auto", 6), ("bfloat16", 6), ("float32", 12)):  # weights + AdamW states
        parts = plan(PlanRequest(method="full", seq_len=512, global_batch_size=1, zero_stage=0, offload="none",
                                 weight_dtype=dtype, optimizer="adamw_torch_fused"), one, shape).per_gpu_bytes
        assert parts["weights"] + parts["optimizer"] == pytest.approx(per_param * n, rel=1e-6)
        # gradients are freed after each step and made as backward frees activations: at the peak, the lm_head's
        # (the first backward makes) or the rest beyond the activations (with the tied embedding's two extra copies);
        # a fused AdamW makes no temporary in its step (test_foreach_adamw_step_temporary_on_a_gpu)
        head = shape.vocab * shape.hidden * per_param / 3
        assert parts["gradients"] == int(max(head, per_param / 3 * n + 2 * head - parts["activations"]))
    # under a launcher DeepSpeed's engine runs even on one GPU at ZeRO-0: bf16 weights and grads, fp32 masters and
    # Adam states (2 + 2 + 12 B/param) all the time; in its step, fp32 copies of the grads and their flat buffer
    # (8 B/param), which at seq 512 outweigh the activations backward has freed by then
    launched = plan(PlanRequest(method="full", seq_len=512, global_batch_size=1, zero_stage=0, offload="none",
                                deepspeed=True), one, shape)
    parts = launched.per_gpu_bytes
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(24 * n, rel=1e-6)
    assert parts["activations"] == 0 and not launched.single_process
    assert any("peak memory at the optimizer step" in r for r in launched.reasons)
    accumulating = plan(PlanRequest(method="full", seq_len=512, global_batch_size=2, zero_stage=0, offload="none",
                                    micro_batch_size=1), one, shape).per_gpu_bytes
    assert accumulating["gradients"] == 2 * n  # kept across micro-batches
    assert plan(PlanRequest(method="full", seq_len=512, global_batch_size=1), one, shape).single_process
    assert mem.load_dtype("auto", "fp16", full_single_process=True) == "float32"
    assert mem.load_dtype("auto", "fp16", full_single_process=False) == "float16"
    assert mem.optimizer_state_bytes("paged_adamw_8bit", 2) == mem.optimizer_state_bytes("paged_adamw_8bit", 4)
    assert mem.optimizer_state_bytes("adamw_torch", 2) == 4
    ds = plan(PlanRequest(method="full", seq_len=512, global_batch_size=2, zero_stage=2), parse_spec("2xA100-80GB"),
              shape).per_gpu_bytes  # DeepSpeed: bf16 weights + fp32 masters, grads and Adam states, partitioned
    assert ds["weights"] == pytest.approx(2 * n, rel=1e-6)


def test_deepspeed_lm_head_is_16_bit_on_any_number_of_ranks():
    """DeepSpeed's engine casts the model to its 16-bit precision whether it runs 1 rank or 2, so the loss's fp32
    upcast of the lm_head is charged alike; only a plain process keeps an fp16 full fine-tune's weights in fp32."""
    shape = resolve_shape("qwen2.5-0.5b")
    request = PlanRequest(method="full", seq_len=4096, global_batch_size=2, zero_stage=2, micro_batch_size=1,
                          gradient_checkpointing=False, deepspeed=True, loss_chunk_tokens=mem.SFT_LOSS_CHUNK_TOKENS)
    per_rank = [plan(request, parse_spec(spec), shape).per_gpu_bytes["activations"] for spec in ("1xT4", "2xT4")]
    assert per_rank[0] == per_rank[1]
    plain = plan(replace(request, zero_stage=0, deepspeed=False, global_batch_size=1), parse_spec("1xT4"), shape)
    copies = 2 * shape.layers * shape.linear_params_per_layer  # autocast's 16-bit weight copies (fp32 weights)
    assert plain.single_process and plain.per_gpu_bytes["activations"] - copies < per_rank[0]  # fp32 head: no upcast


def test_load_bytes_follow_the_load_dtype():
    """Host RAM while from_pretrained runs is the model in the dtype it loads in: an fp16 full fine-tune in one
    process loads fp32 (4 B/param), the same run under DeepSpeed fp16 (2 B); QLoRA and zero.Init one shard."""
    shape = resolve_shape("qwen2.5-0.5b")
    n, t4 = shape.num_params, parse_spec("1xT4")
    request = PlanRequest(method="full", seq_len=512, global_batch_size=1, zero_stage=0, offload="none")
    assert plan(request, t4, shape).load_bytes_per_rank == 4 * n
    assert plan(replace(request, deepspeed=True), t4, shape).load_bytes_per_rank == 2 * n
    seven = resolve_shape("llama-2-7b")
    qlora = plan(PlanRequest(method="qlora", seq_len=512, global_batch_size=1, **QLORA), t4, seven)
    assert qlora.load_bytes_per_rank == mem.LOAD_SHARD_BYTES


def test_lora_dropout_masks_per_device():
    shape = resolve_shape("llama-2-7b")
    kw = dict(seq_len=1024, micro_batch=1, checkpointing=False, lora_r=16, lora_targets="all-linear")
    plain = mem.activation_bytes(shape, **kw)
    fan_ins = sum(i for i, _ in mem.lora_modules(shape, "all-linear").values())
    per_mask_byte = shape.layers * 1024 * fan_ins
    assert mem.activation_bytes(shape, **kw, lora_dropout=0.05) - plain == per_mask_byte  # CUDA: a bool each
    assert mem.activation_bytes(shape, **kw, lora_dropout=0.05, device="cpu") - plain == 4 * per_mask_byte


def test_request_from_recipe_methods():
    assert request_from_recipe(_cfg("qlora", peft="lora")).method == "qlora"
    assert request_from_recipe(_cfg("sft", peft="lora", load_in_4bit=True)).method == "qlora"
    assert request_from_recipe(_cfg("sft", peft="dora")).method == "lora"
    assert request_from_recipe(_cfg("sft")).method == "full"
    r = request_from_recipe(_cfg("sft", zero_stage=3, offload="optimizer"))
    assert (r.zero_stage, r.offload, r.optimizer, r.seq_len) == (3, "optimizer", "paged_adamw_8bit", 1024)
    # SFTTrainer's chunked loss unless the recipe picks another loss or Liger; DPO computes whole logits
    assert request_from_recipe(_cfg("sft")).loss_chunk_tokens == mem.SFT_LOSS_CHUNK_TOKENS
    nll = _cfg("sft")
    nll.training["loss_type"] = "nll"
    assert request_from_recipe(nll).loss_chunk_tokens == 0
    dpo = request_from_recipe(_cfg("dpo"))
    assert dpo.loss_chunk_tokens == 0 and dpo.logit_bytes == mem.DPO_LOGIT_BYTES  # TRL's DPO keeps fp32 logits
    assert request_from_recipe(_cfg("sft")).logit_bytes is None
    lora = request_from_recipe(_cfg("sft", peft="lora"))
    assert (lora.lora_dropout, lora.weight_dtype) == (0.05, "auto")
    assert request_from_recipe(_cfg("sft")).lora_dropout == 0.0  # full fine-tune: no adapters, no masks


def test_request_notes_compiled_memory_is_planned_as_eager():
    compiled = _cfg("sft")
    compiled.training["torch_compile"] = True
    assert any(n.startswith("training.torch_compile") for n in request_from_recipe(compiled).notes)
    assert request_from_recipe(compiled).attention == "sdpa" and not request_from_recipe(_cfg("sft")).notes


def test_request_from_recipe_dpo_and_ppo():
    dpo = request_from_recipe(_cfg("dpo"))
    assert [m.role for m in dpo.extra_models] == ["reference"] and dpo.sequences_per_example == 2
    ppo = request_from_recipe(_cfg("ppo", extra={"ppo": {"reward_model": "runs/rm_not_trained_yet"}}))
    assert sorted(m.role for m in ppo.extra_models) == ["reference", "reward", "value"]
    assert any("not found offline" in note for note in ppo.notes)
    p = plan(ppo, parse_spec("8xA100-80GB"))
    assert set(p.models) == {"policy", "reference", "reward", "value"}


def test_grpo_reward_models_are_a_whole_copy_per_rank():
    """GRPO's reward model runs inside a reward function, outside DeepSpeed: every rank holds all of it, even where
    ZeRO-3 partitions the policy; reward functions by name cost nothing."""
    assert not request_from_recipe(_cfg("grpo", extra={"grpo": {"reward": "arith"}})).extra_models
    from launcher.recipe_request import REWARD_FUNCTIONS
    from recipes.rewards import REWARDS

    assert set(REWARD_FUNCTIONS) == set(REWARDS)  # a bare directory name (grpo.reward: rm_out) is a model to both
    request = request_from_recipe(_cfg("grpo", extra={"grpo": {"reward": ["arith", "runs/rm_not_trained_yet"]}}))
    assert [(m.role, m.replicated) for m in request.extra_models] == [("reward", True)]
    p = plan(replace(request, zero_stage=3), parse_spec("8xA100-80GB"))
    reward = p.models["reward"]
    assert reward["placement"] == "replicated" and reward["weights"] >= 2 * reward["params"]  # bf16, not / 8 ranks
    assert p.models["policy"]["placement"] == "partitioned"


def test_tied_embedding_gradients_at_the_end_of_backward():
    """One process, no accumulation: the peak is the start of backward (activations + the head's gradient) or its
    end (every gradient; a tied embedding's two contributions and their sum coexist, traced on qwen2.5-0.5b)."""
    one = parse_spec("1xH100-80GB")
    for name, tied in (("qwen2.5-0.5b", True), ("llama-2-7b", False)):
        shape = resolve_shape(name)
        assert shape.tied_embeddings == tied
        request = PlanRequest(method="full", seq_len=256, global_batch_size=1, zero_stage=0, offload="none",
                              micro_batch_size=1, gradient_checkpointing=True, optimizer="adamw_torch_fused")
        parts = plan(request, one, shape).per_gpu_bytes
        grads, head = 2 * shape.num_params, 2 * shape.vocab * shape.hidden  # bf16, trained in its load dtype
        extra = 2 * head if tied else 0
        assert parts["gradients"] == int(max(head, grads + extra - parts["activations"]))


def test_qlora_adapters_in_bf16_under_trl_trainers():
    """TRL's SFT/DPO/GRPO/reward trainers convert a 4-bit model's adapters to bf16 (traced: bf16 LoRA weights and
    AdamW states); the HF Trainer (classification) keeps PEFT's fp32 adapters; DeepSpeed keeps fp32 masters."""
    assert request_from_recipe(_cfg("qlora", peft="lora", load_in_4bit=True)).quantized_adapter_bytes == 2
    assert request_from_recipe(_cfg("classify", peft="lora", load_in_4bit=True)).quantized_adapter_bytes == 4
    shape = resolve_shape("llama-2-7b")
    request = PlanRequest(method="qlora", seq_len=512, global_batch_size=2, lora_r=64, optimizer="adamw_torch_fused",
                          zero_stage=0, offload="none", micro_batch_size=1, gradient_checkpointing=True)
    one = parse_spec("1xRTX3090-24GB")
    n = mem.lora_params(shape, 64, "all-linear")
    fp32, bf16 = (plan(replace(request, quantized_adapter_bytes=b), one, shape).per_gpu_bytes for b in (4, 2))
    assert (fp32["optimizer"], bf16["optimizer"]) == (8 * n, 4 * n)  # AdamW states in the parameter's dtype
    assert fp32["weights"] - bf16["weights"] == 2 * n and (fp32["gradients"], bf16["gradients"]) == (4 * n, 2 * n)
    launched = plan(replace(request, quantized_adapter_bytes=2, deepspeed=True), one, shape).per_gpu_bytes
    assert launched["optimizer"] == 12 * n  # fp32 master + Adam, whatever TRL cast the adapters to


def test_rollout_methods_plan_prompt_plus_generated_tokens():
    """GRPO/PPO train on prompt + sampled answer; GRPO takes logits of the completion only (16 B each, traced) and
    samples the rank's whole batch at once (TRL's steps_per_generation = gradient accumulation)."""
    grpo = request_from_recipe(_cfg("grpo", extra={"grpo": {"max_completion_length": 256}}))
    assert (grpo.seq_len, grpo.logit_tokens, grpo.logit_bytes, grpo.generates_rank_batch) == \
        (1024 + 256, 256, mem.GRPO_LOGIT_BYTES, True)
    assert any("1280 tokens" in note for note in grpo.notes)
    ppo = request_from_recipe(_cfg("ppo", extra={"ppo": {"local_rollout_forward_batch_size": 4}}))
    assert (ppo.seq_len, ppo.logit_tokens, ppo.generates_rank_batch) == (1024 + 64, None, False)  # eval's 64 tokens
    assert (ppo.generated_tokens, ppo.keeps_rollout_logits, ppo.rollout_chunk, ppo.autocast) == (64, True, 4, False)
    assert grpo.autocast and not grpo.keeps_rollout_logits and grpo.generated_tokens == 256
    assert request_from_recipe(_cfg("sft")).seq_len == 1024
    shape = resolve_shape("qwen2.5-0.5b")
    kw = dict(seq_len=1280, micro_batch=2, per_logit=mem.GRPO_LOGIT_BYTES)
    assert mem.logits_bytes(shape, **kw, logit_tokens=256) == 256 * 2 * shape.vocab * 16
    assert mem.logits_bytes(shape, **kw, logit_tokens=256) * 5 == mem.logits_bytes(shape, **kw)
    # the KV cache of a whole-batch rollout grows with accumulation, a micro-batch's does not
    long = resolve_shape("llama-2-7b")  # no GQA: a large cache
    request = PlanRequest(method="lora", seq_len=4096, global_batch_size=64, zero_stage=0, offload="none",
                          micro_batch_size=1, gradient_checkpointing=True, generates=True)
    one = parse_spec("1xH100-80GB")
    micro = plan(request, one, long).per_gpu_bytes["activations"]
    whole = plan(replace(request, generates_rank_batch=True), one, long).per_gpu_bytes["activations"]
    assert whole == mem.kv_cache_bytes(long, seq_len=4096, micro_batch=64) > micro


def test_ppo_trains_policy_and_value_in_one_backward_without_autocast():
    """TRL's PolicyAndValueWrapper: both models' activations coexist; its Accelerator has no mixed precision, so in
    one process PEFT's fp32 adapters get fp32 copies of their inputs (traced live on CPU)."""
    shape = resolve_shape("qwen2.5-0.5b")
    kw = dict(seq_len=256, micro_batch=2, checkpointing=False, lora_r=16, lora_targets="all-linear")
    policy = mem.activation_bytes(shape, **kw) + mem.logits_bytes(shape, seq_len=256, micro_batch=2)
    value = mem.activation_bytes(shape, seq_len=256, micro_batch=2, checkpointing=False, trainable_base=True)
    request = PlanRequest(method="lora", seq_len=256, global_batch_size=2, lora_r=16, zero_stage=0, offload="none",
                          micro_batch_size=2, gradient_checkpointing=False, generates=True,
                          extra_models=[ExtraModel("reward", shape), ExtraModel("value", shape, trainable=True)])
    one = parse_spec("1xH100-80GB")
    assert plan(request, one, shape).per_gpu_bytes["activations"] == pytest.approx(policy + value, rel=1e-9)
    fp32_inputs = plan(replace(request, autocast=False), one, shape).per_gpu_bytes["activations"]
    lora = mem.activation_bytes(shape, **kw) - mem.activation_bytes(shape, **{**kw, "lora_r": 0})
    assert fp32_inputs - (policy + value) == pytest.approx(lora, rel=1e-9)  # 4 B instead of 2 per element
    # DeepSpeed's bf16 engine: 16-bit adapters (8 rows, so that backward, not the step's fp32 grads, is the peak)
    launched = plan(replace(request, autocast=False, deepspeed=True, global_batch_size=8, micro_batch_size=8), one,
                    shape).per_gpu_bytes["activations"]
    kw8 = {**kw, "micro_batch": 8}
    assert launched == pytest.approx(mem.activation_bytes(shape, **kw8) + mem.logits_bytes(shape, seq_len=256,
                                     micro_batch=8) + mem.activation_bytes(shape, **{**kw8, "lora_r": 0,
                                                                                    "trainable_base": True}), rel=1e-9)


def test_ppo_rollout_keeps_fp32_sampling_logits():
    """TRL's batch_generation keeps every sampled token's fp32 logits for the whole rollout: through training, and
    three copies while the next rollout is sampled (previous, the chunks, the padded result)."""
    shape = resolve_shape("smollm2-135m")
    v = shape.vocab
    kept, sampling = mem.ppo_rollout_bytes(shape, rank_batch=16, micro_batch=1, response_tokens=256, prompt_tokens=64)
    assert kept == 16 * 256 * v * 4
    assert sampling == 3 * kept + mem.kv_cache_bytes(shape, seq_len=320, micro_batch=8)
    assert mem.ppo_rollout_bytes(shape, rank_batch=4, micro_batch=1, response_tokens=8, prompt_tokens=8)[0] == \
        4 * 8 * v * 4  # one short chunk: not padded to the chunk size
    assert mem.ppo_rollout_bytes(shape, rank_batch=12, micro_batch=1, response_tokens=8, prompt_tokens=8)[0] == \
        16 * 8 * v * 4  # 8 + 4 rows: the short chunk is padded to 8
    request = PlanRequest(method="lora", seq_len=320, global_batch_size=16, lora_r=16, zero_stage=0, offload="none",
                          micro_batch_size=1, gradient_checkpointing=False, generates=True, generated_tokens=256,
                          keeps_rollout_logits=True, extra_models=[ExtraModel("value", shape, trainable=True)])
    one = parse_spec("1xH100-80GB")
    with_rollout = plan(request, one, shape).per_gpu_bytes
    without = plan(replace(request, keeps_rollout_logits=False, generates=False), one, shape).per_gpu_bytes
    assert sampling > without["activations"] + kept + without["gradients"]
    # the rollout peaks; sampled between optimizer steps, after zero_grad: no gradients then
    assert (with_rollout["activations"], with_rollout["gradients"]) == (int(sampling), 0)
    assert without["gradients"] > 0
    # training peaks (one micro-batch, no accumulation): the kept logits add to the activations, and backward, which
    # frees activations while it makes gradients, does not free them
    short = replace(request, global_batch_size=1, seq_len=16, generated_tokens=8)
    with_kept = plan(short, one, shape).per_gpu_bytes
    plain = plan(replace(short, keeps_rollout_logits=False, generates=False), one, shape).per_gpu_bytes
    kept_short = mem.ppo_rollout_bytes(shape, rank_batch=1, micro_batch=1, response_tokens=8, prompt_tokens=8)[0]
    assert with_kept["activations"] == pytest.approx(plain["activations"] + kept_short, abs=1)
    assert with_kept["gradients"] == plain["gradients"] > 0
    # under DeepSpeed the gradient buffers stay while the rollout is sampled
    launched = plan(replace(request, deepspeed=True), one, shape).per_gpu_bytes
    assert launched["activations"] == int(sampling) and launched["gradients"] > 0
    # ZeRO-3 gathers the trained models (policy + value) whole for generation
    two = parse_spec("2xH100-80GB")
    sharded = replace(request, global_batch_size=32, zero_stage=3)
    n, lora = shape.num_params, mem.lora_params(shape, 16, "all-linear")
    gathered = (lora * 2 + n * 2 + n * 2) / 2  # policy (adapters + frozen base) and value, less this rank's half
    assert plan(sharded, two, shape).per_gpu_bytes["activations"] == pytest.approx(sampling + gathered, rel=1e-6)


# Where each shipped recipe says it runs (its header comment / description), offline from its shapes alone.
RECIPE_TARGETS = {"qlora_7b": "1xRTX3090-24GB", "lora_7b": "1xA100-80GB", "dpo_7b": "1xA100-80GB",
                  "rm_7b": "1xA100-80GB", "sft_7b": "8xA100-80GB", "ppo_7b": "8xA100-80GB", "rlhf_7b": "8xA100-80GB"}


def test_real_recipes_plan_offline():
    """Every shipped recipe plans without a download and fits where it says it runs: the tiny, small and
    classification ones on this CPU, the 7B ones on their GPUs without offload; full SFT of 7B is refused on one
    24 GB card."""
    from launcher.config import available_recipes, load_recipe

    names = set(available_recipes())
    assert set(RECIPE_TARGETS) <= names
    for name in sorted(names):
        cfg = load_recipe(name, None, [])
        p = plan(request_from_recipe(cfg), parse_spec(RECIPE_TARGETS.get(name, "cpu")))
        assert p.fits and not p.offload_param, (name, p.reason)
        if name in RECIPE_TARGETS:
            assert fits_on_gpu_alone(p), (name, p.reason)
    assert not plan(request_from_recipe(load_recipe("sft_7b", None, [])), parse_spec("1xRTX3090-24GB")).fits


# ---------------------------------------------------------------- command line

def test_cmd_plan_is_torch_free():
    """`ftlaunch plan` never imports torch (its speed is bench/planner.py's figure, not a timed test)."""
    code = ("import sys; from launcher.plan_cmd import cmd_plan; "
            "rc = cmd_plan(['--recipe', 'qlora_7b', '--inventory', '1xRTX3090-24GB', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; assert rc == 0, rc")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_listing_commands_do_not_load_torch(tmp_path):
    """`ftlaunch runs` and `recipes` answer in a fraction of a second: importing torch/transformers (and through
    peft, bitsandbytes) would cost ~8 s here and print bitsandbytes' CPU-kernel notice. (`ftlaunch slurm` does
    import TRL: it checks training.* keys against the recipe's TrainingArguments before a job queues.)"""
    code = ("import sys; from launcher.cli import main; "
            f"rcs = [main(['runs', {str(tmp_path)!r}]), main(['recipes'])]; "
            "assert rcs == [0, 0], rcs; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules); "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_cmd_plan_exit_codes(capsys):
    from launcher.plan_cmd import cmd_inventory, cmd_plan

    assert cmd_plan(["--model", "llama-2-7b", "--method", "full", "--inventory", "1xRTX3090-24GB"]) == 3
    assert "short by" in capsys.readouterr().err
    assert cmd_plan(["--model", "llama-2-7b", "--method", "qlora", "--inventory", "1xRTX3090-24GB",
                     "--optim", "paged_adamw_8bit", "--lora-r", "64"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "rejected:" in out
    with pytest.raises(UserError, match="inventory spec"):
        cmd_plan(["--model", "llama-2-7b", "--inventory", "lots-of-gpus"])
    with pytest.raises(UserError, match="pass a local path with config.json"):
        cmd_plan(["--model", "acme/unknown-model-9b", "--inventory", "1xA100"])
    assert cmd_inventory(["--inventory", "4x8xH100-80GB", "--json"]) == 0
    assert '"world_size": 32' in capsys.readouterr().out


def test_cmd_plan_recipe_pins_and_ds_config(capsys):
    from launcher.plan_cmd import cmd_plan

    import json

    rc = cmd_plan(["--recipe", "sft_tiny", "--inventory", "2xcpu", "--zero-stage", "2", "--micro-batch", "4",
                   "--gradient-checkpointing", "on", "--json", "data.max_length=64"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["zero_stage"], data["micro_batch_size"], data["gradient_checkpointing"], data["seq_len"]) == \
        (2, 4, True, 64)
    assert data["deepspeed_config"]["train_batch_size"] == data["global_batch_size"]
    assert data["deepspeed_config"]["gradient_clipping"] == 1.0  # HF's default max_grad_norm
    # the printed JSON is the one the run writes: it carries the recipe's clipping, not the default
    assert cmd_plan(["--recipe", "sft_tiny", "--inventory", "2xcpu", "--json", "training.max_grad_norm=0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["deepspeed_config"]["gradient_clipping"] == 0.3


def test_cmd_plan_answers_the_question_asked(capsys, tmp_path):
    """--model-only flags beside a recipe are refused rather than silently ignored; --ds-config plans the launched
    run its JSON is for (a plan for one plain process has no DeepSpeed JSON); --hostfile plans for the file's
    nodes."""
    import json

    from launcher.plan_cmd import cmd_inventory, cmd_plan

    with pytest.raises(UserError, match="--method applies without a recipe"):
        cmd_plan(["--recipe", "lora_tiny", "--method", "full"])
    one_gpu = ["--model", "llama-3-8b", "--method", "full", "--seq-len", "1024", "--inventory", "1xH100-80GB"]
    assert cmd_plan([*one_gpu, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["single_process"] and single["deepspeed_config"] is None
    assert cmd_plan([*one_gpu, "--ds-config"]) == cmd_plan([*one_gpu, "--deepspeed"]) == 3  # fp32 masters
    capsys.readouterr()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=4\nn2 slots=4\n")
    assert cmd_inventory(["--hostfile", str(hostfile), "--json"]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert (seen["nodes"], seen["ranks_per_node"], seen["source"]) == (2, 4, "hostfile")
    assert cmd_plan(["--recipe", "lora_tiny", "--hostfile", str(hostfile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_size"] == 8


def test_a_pinned_plan_says_what_the_pins_cost():
    from launcher.config import load_recipe

    request = request_from_recipe(load_recipe("qlora_7b"))
    free = plan(request, parse_spec("1xRTX3090-24GB"))
    pinned = plan(replace(request, zero_stage=3), parse_spec("1xRTX3090-24GB"))
    assert pinned.predicted_step_seconds > free.predicted_step_seconds
    cost = next(r for r in pinned.reasons if r.startswith("the pins cost"))
    assert f"micro-batch {free.micro_batch_size} (predicted {free.predicted_step_seconds:.3g} s/step" in cost
    same = plan(replace(request, micro_batch_size=free.micro_batch_size), parse_spec("1xRTX3090-24GB"))
    assert any(r.startswith("the pins cost nothing") for r in same.reasons)
    assert not any("the pins cost" in r for r in free.reasons)


def test_zero_gradients_in_backward_are_16_bit_and_fp32_ones_exist_only_in_the_step():
    """DeepSpeed with bf16 (no grad_accum_dtype): ZeRO-1 keeps the 16-bit grads whole, ZeRO-2/3 the rank's partition;
    the fp32 partition the optimizer steps on is made in step() after backward (stage_1_and_2.py, stage3.py), so the
    peak is backward's or the step's, not both at once."""
    shape = resolve_shape("llama-2-7b")
    n, dp = shape.num_params, 8
    for stage, g16 in ((1, 2 * n), (2, 2 * n / dp), (3, 2 * n / dp)):
        s = mem.model_states(trainable=n, frozen_bytes=0, precision="bf16", state_bytes=8, zero_stage=stage, dp=dp,
                             largest_layer=shape.largest_layer_params if stage == 3 else 0)
        assert (s.gradients, s.step_gradients) == (pytest.approx(g16), pytest.approx(4 * n / dp))
    request = PlanRequest(method="full", seq_len=2048, global_batch_size=8, zero_stage=1, micro_batch_size=1,
                          gradient_checkpointing=False, loss_chunk_tokens=mem.SFT_LOSS_CHUNK_TOKENS, deepspeed=True)
    p = plan(request, parse_spec("8xA100-80GB"), shape)
    parts = p.per_gpu_bytes
    assert p.fits and parts["gradients"] == int(2 * n) and parts["activations"] > 4 * n / dp  # backward is the peak


def test_ppo_mini_batches_train_without_accumulation():
    """TRL's PPO steps its optimizer once per mini-batch only without accumulation (its Accelerator accumulates over
    whole rollout batches): num_mini_batches k > 1 pins micro-batch = the per-rank batch, each backward on 1/k of it."""
    shape = resolve_shape("qwen2.5-0.5b")
    request = PlanRequest(method="lora", seq_len=512, global_batch_size=16, generates=True, mini_batches=4,
                          extra_models=[ExtraModel("reward", shape), ExtraModel("value", shape, trainable=True)])
    two = parse_spec("2xA100-80GB")
    p = plan(request, two, shape)
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (8, 1)
    assert any("4 mini-batches of 2 rows" in r for r in p.reasons)
    rows2 = plan(replace(request, mini_batches=1, micro_batch_size=2), two, shape)
    assert p.per_gpu_bytes["activations"] == rows2.per_gpu_bytes["activations"]  # the memory of 2-row backwards
    with pytest.raises(UserError, match="plan.micro_batch_size=2: with ppo.num_mini_batches=4"):
        plan(replace(request, micro_batch_size=2), two, shape)
    with pytest.raises(UserError, match="ppo.num_mini_batches=3 does not divide the per-rank rollout batch 8"):
        plan(replace(request, mini_batches=3), two, shape)


def test_offload_is_chosen_only_when_clearly_faster():
    """Offload needs host RAM and PCIe time the cost model does not see: a plan without it wins unless offload is
    predicted at least planner.OFFLOAD_MARGIN faster, and the rejection says so."""
    shape = resolve_shape("qwen2.5-7b")
    request = PlanRequest(method="lora", seq_len=512, global_batch_size=64, deepspeed=True,
                          loss_chunk_tokens=mem.SFT_LOSS_CHUNK_TOKENS)
    p = plan(request, parse_spec("1xRTX3090-24GB"), shape)
    assert p.fits and p.offload == "none"
    close = [r for r in p.rejected if "offload is chosen only when predicted at least 10 % faster" in r["reason"]]
    assert close and all(r["plan"]["offload"] != "none" for r in close)


def test_zero3_charges_what_its_reuse_window_keeps_gathered():
    """stage3_max_reuse_distance (1e9 elements, the generated config's) keeps gathered every parameter reused within
    it in the step's trace: a trained 0.5B model stays whole on each rank, a trained 70B one keeps ~0.5e9 parameters
    of its last layers (each is reused after the rest of the forward and as much backward); a forward-only model
    reuses nothing (one layer at a time). The optimizer step comes after ZeRO-3 has released them all."""
    small, big = resolve_shape("qwen2.5-0.5b"), resolve_shape("llama-2-70b")
    layer = big.largest_layer_params
    assert mem.zero3_gathered_bytes(2 * small.num_params, small.largest_layer_params, 2, backward=True) == \
        2 * small.num_params + 2 * small.largest_layer_params
    assert mem.zero3_gathered_bytes(2 * big.num_params, layer, 2, backward=True) == \
        2 * (mem.STAGE3_REUSE_NUMEL // 2 + layer) + 2 * layer
    assert mem.zero3_gathered_bytes(2 * big.num_params, layer, 2, backward=False) == 2 * layer
    seven = resolve_shape("llama-2-7b")  # on 2 ranks: fp32 grads of a 1e9 sub-group + Adam's temporary, 8 GB
    step = plan(PlanRequest(method="full", seq_len=64, global_batch_size=2, zero_stage=3, micro_batch_size=1,
                            gradient_checkpointing=True, deepspeed=True), parse_spec("2xH100-80GB"), seven)
    assert any("peak memory at the optimizer step" in r for r in step.reasons)
    assert step.per_gpu_bytes["weights"] == int(2 * seven.num_params / 2)  # the partition alone
    assert step.per_gpu_bytes["gradients"] == int(2 * seven.num_params / 2 + 8 * mem.STAGE3_SUB_GROUP_NUMEL)
    request = PlanRequest(method="full", seq_len=512, global_batch_size=8, zero_stage=3, micro_batch_size=1,
                          deepspeed=True)
    parts = plan(request, parse_spec("8xA100-80GB"), small).per_gpu_bytes
    assert parts["weights"] >= 2 * small.num_params  # partition + the whole model gathered
    assert deepspeed_config(plan(request, parse_spec("8xA100-80GB"), small))["zero_optimization"][
        "stage3_max_reuse_distance"] == mem.STAGE3_REUSE_NUMEL


def test_reward_and_value_models_have_a_score_head_not_an_lm_head():
    """AutoModelForSequenceClassification drops the lm_head for a hidden x 1 score head: an untied 7B reward model
    is vocab x hidden parameters smaller than the causal LM, as the planner counts it for rm and PPO's side models."""
    from launcher.config import load_recipe

    llama = resolve_shape("llama-2-7b")
    scored = replace(llama, score_head=True)
    assert llama.num_params - scored.num_params == llama.vocab * llama.hidden - llama.hidden
    assert request_from_recipe(load_recipe("rm_7b", None, [])).shape.score_head
    ppo = request_from_recipe(load_recipe("ppo_7b", None, []))
    assert not ppo.shape.score_head
    assert {m.role: m.shape.score_head for m in ppo.extra_models} == {"reference": False, "reward": True,
                                                                      "value": True}


def test_host_ram_of_a_what_if_is_settable_and_suggested():
    """A what-if's host RAM is a guess (2x its GPU memory, at least 64 GiB): when only the host is short, the miss
    says how much would do and --host-ram sets it; larger suggested inventories assume RAM as their own spec would,
    so the fewest GPUs that fit are suggested (a 70B QLoRA fits 2 RTX 3090s, not 16)."""
    shape = resolve_shape("llama-3.1-70b")
    request = PlanRequest(method="qlora", seq_len=2048, global_batch_size=16,
                          loss_chunk_tokens=mem.SFT_LOSS_CHUNK_TOKENS)
    short = plan(request, parse_spec("1xRTX3090-24GB"), shape)
    assert not short.fits and "short by" in short.reason
    assert ("GiB of host RAM per node (for the fastest plan that fits this GPU; --host-ram to plan with what you "
            "have)") in short.reason
    assert short.reason.endswith("2xRTX3090-24GB")
    assert plan(request, parse_spec("1xRTX3090-24GB", host_ram_bytes=128 * GiB), shape).fits
    assert parse_spec("8xRTX3090-24GB").host_ram_bytes == 2 * 8 * 24 * GiB
    with pytest.raises(UserError, match="--host-ram: sets a what-if --inventory spec's host RAM"):
        from launcher.inventory import detect_inventory
        detect_inventory(None, env={}, host_ram_bytes=GiB)


def test_one_gpu_zero3_does_not_claim_to_partition_across_ranks():
    shape = resolve_shape("llama-2-7b")
    p = plan(PlanRequest(method="lora", seq_len=512, global_batch_size=4, zero_stage=3, deepspeed=True),
             parse_spec("1xA100-80GB"), shape)
    assert p.fits and not any("across ranks" in r for r in p.reasons)


def test_ppo_rollout_logits_outlive_backward_into_the_optimizer_step():
    """TRL's PPO keeps the rollout's fp32 logits through every update: at DeepSpeed's optimizer step (the peak here,
    a fully trained value model's fp32 grads) they are still there, while backward's activations are not."""
    shape = resolve_shape("qwen2.5-0.5b")
    request = PlanRequest(method="lora", seq_len=64, global_batch_size=8, zero_stage=0, micro_batch_size=8,
                          gradient_checkpointing=True, deepspeed=True, generates=True, keeps_rollout_logits=True,
                          generated_tokens=16, extra_models=[ExtraModel("reward", shape),
                                                             ExtraModel("value", shape, trainable=True)])
    p = plan(request, parse_spec("1xH100-80GB"), shape)
    kept, _ = mem.ppo_rollout_bytes(shape, rank_batch=8, micro_batch=8, response_tokens=16, prompt_tokens=48)
    assert any("peak memory at the optimizer step" in r for r in p.reasons)
    assert p.per_gpu_bytes["activations"] == int(kept) > 0


def test_foreach_adamw_step_temporary_on_a_gpu():
    """torch's AdamW defaults to its foreach implementation on CUDA, whose step makes sqrt(exp_avg_sq) for every
    parameter at once (in the states' dtype): with every gradient still there, that step can be the peak of a plain
    one-GPU full fine-tune. The fused AdamW makes none, and on CPUs the for-loop one makes it a tensor at a time."""
    shape = resolve_shape("qwen2.5-0.5b")
    n = shape.num_params
    request = PlanRequest(method="full", seq_len=64, global_batch_size=1, zero_stage=0, offload="none",
                          micro_batch_size=1, gradient_checkpointing=True)
    foreach = plan(request, parse_spec("1xA100-80GB"), shape)
    assert any("peak memory at the optimizer step" in r for r in foreach.reasons)
    assert foreach.to_json()["peak_at"] == "optimizer step"
    assert foreach.per_gpu_bytes["gradients"] == 2 * n + 2 * n and foreach.per_gpu_bytes["activations"] == 0
    fused = plan(replace(request, optimizer="adamw_torch_fused"), parse_spec("1xA100-80GB"), shape)
    assert fused.per_gpu_bytes["total"] < foreach.per_gpu_bytes["total"]
    cpu = plan(request, parse_spec("cpu", host_ram_bytes=64 * GiB), shape)
    assert not any("optimizer step" in r for r in cpu.reasons)


def test_autocast_keeps_16_bit_copies_of_fp32_weights_for_backward():
    """One process, fp32 weights (an fp16 GPU's full fine-tune loads fp32) under fp16 autocast: every linear layer's
    matmul saves the 16-bit cast of its weight for backward (2 B per linear parameter), which bf16-loaded weights
    do not need."""
    shape = resolve_shape("qwen2.5-0.5b")
    request = PlanRequest(method="full", seq_len=512, global_batch_size=1, micro_batch_size=1, zero_stage=0,
                          offload="none", gradient_checkpointing=True, optimizer="adamw_torch_fused")
    t4 = plan(request, parse_spec("1xT4"), shape)  # fp16 precision: loads fp32
    on_bf16 = plan(request, parse_spec("1xA100-80GB"), shape)  # bf16 weights: nothing to cast
    as_fp32 = plan(replace(request, weight_dtype="float32"), parse_spec("1xA100-80GB"), shape)
    copies = 2 * shape.layers * shape.linear_params_per_layer
    assert as_fp32.per_gpu_bytes["activations"] - on_bf16.per_gpu_bytes["activations"] == pytest.approx(copies,
                                                                                                        rel=0.01)
    assert t4.single_process and t4.per_gpu_bytes["activations"] >= copies
