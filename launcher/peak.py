"""What one rank holds at its peak for one candidate plan: every model's ZeRO share (weights, gradients, optimizer
states, host), the activations of training, rollouts (PPO/GRPO) and the fixed runtime. Pure; no torch.

The byte formulas live in launcher/memory.py; this module applies them to the planner's context (launcher/planner.py),
including which of them coexist at the peak.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from launcher import memory as mem

if TYPE_CHECKING:
    from launcher.planner import _Context


def peak_parts(ctx: "_Context", stage: int, offload: str, checkpointing: bool, micro: int, hpz: bool):
    """(per-rank bytes by part, per-model breakdown, host bytes per rank, load bytes per rank, the moment of the peak:
    backward, rollout or optimizer step) of one candidate."""
    inv = ctx.inventory
    key = (stage, offload, hpz)
    if key not in ctx.cache:
        ctx.cache[key] = _states(ctx, stage, offload, hpz)
    states, models, host_per_rank, load = ctx.cache[key]
    single = ctx.single_process(stage, offload)
    akey = ("activations", checkpointing, micro, single)
    if akey not in ctx.cache:
        ctx.cache[akey] = _activations(ctx, checkpointing, micro, single)
    backward, kept, sampling = ctx.cache[akey]
    activations = backward + kept
    fixed = mem.runtime_bytes(device=inv.device, zero_stage=stage, hidden=ctx.shape.hidden,
                              precision=ctx.precision, dp=ctx.dp)
    gradients = states.gradients
    if single and ctx.per_rank_batch == micro:
        # No DeepSpeed, no accumulation: HF frees the gradients after each step (zero_grad, set_to_none) and backward
        # makes them as it frees activations; only the lm_head's, the first it makes, meets all of them. A tied
        # embedding ends backward with three vocab-sized tensors at once: its two contributions and their sum (traced).
        head = _head_gradient_bytes(ctx)
        tied = 2 * head if ctx.shape.tied_embeddings else 0
        gradients = max(head, gradients + tied - backward)
    if sampling and stage == 3:
        # TRL gathers the trained model(s) whole for generation (ds3_gather_for_generation, its default)
        sampling += sum(m.trainable * mem.ELEMENT_BYTES[ctx.precision] + m.frozen_bytes
                        for m in ctx.models if m.trainable) * (1 - 1 / ctx.dp)
    # (weights, activations, gradients) at each moment that can peak; the largest wins, backward on ties
    moments = {"backward": (states.weights, activations, gradients)}
    if sampling:
        # PPO/GRPO sample rollouts between optimizer steps; in one process zero_grad has freed the gradients by then
        # (DeepSpeed keeps its gradient buffers)
        moments["rollout"] = (states.weights, sampling, 0 if single else gradients)
    if states.step_gradients:
        # The optimizer step: DeepSpeed's fp32 gradients, the optimizer's temporaries, every gradient whole; of the
        # activations only what outlives backward (PPO's rollout logits); ZeRO-3 has released its gathered weights
        # first (stage3.py step: _partition_all_parameters)
        moments["optimizer step"] = (states.weights - states.gathered, kept, states.gradients + states.step_gradients)
    peak_at = max(moments, key=lambda k: sum(moments[k]))
    weights, activations, gradients = moments[peak_at]
    dynamic = weights + gradients + states.optimizer + activations
    parts = {"weights": int(weights), "gradients": int(gradients), "optimizer": int(states.optimizer),
             "activations": int(activations), "other": int(fixed + mem.FRAGMENTATION * dynamic)}
    parts["total"] = sum(parts.values())
    return parts, models, host_per_rank, load, peak_at


def _load_bytes(ctx: "_Context", full_single_process: bool) -> int:
    """Bytes per weight as loaded (mem.load_dtype); for a full fine-tune in one process, also as trained."""
    dtype = mem.load_dtype(ctx.request.weight_dtype, ctx.precision, full_single_process=full_single_process)
    return {"bfloat16": 2, "float16": 2}.get(dtype, 4)


def _head_weight_bytes(ctx: "_Context", model, single_process: bool) -> int:
    """Bytes per lm_head weight during the forward (the loss upcasts a 16-bit one): QLoRA's is fp32 already
    (prepare_model_for_kbit_training); DeepSpeed's engine casts the whole module to its 16-bit precision, on any
    number of ranks; one plain process keeps the load dtype (fp16 full fine-tunes load in fp32)."""
    if model.quantized:
        return 4
    if not single_process and ctx.precision in ("bf16", "fp16"):
        return 2
    return _load_bytes(ctx, single_process and not model.is_lora)


def _head_gradient_bytes(ctx: "_Context") -> float:
    policy = ctx.models[0]
    if policy.is_lora or not policy.trainable or policy.shape.score_head:  # a score head has no vocab-sized logits
        return 0.0
    return policy.shape.vocab * policy.shape.hidden * _load_bytes(ctx, True)


def _states(ctx: "_Context", stage: int, offload: str, hpz: bool):
    total = mem.ModelStates()
    per_model = {}
    single_process = ctx.single_process(stage, offload)
    load = 0.0
    e = mem.ELEMENT_BYTES[ctx.precision]
    for m in ctx.models:
        m_stage, m_offload = (0, "none") if m.replicated else (stage, offload)  # the recipe's own copy
        param_bytes, state_bytes = 4, ctx.state_bytes  # adapters and DeepSpeed's masters: fp32
        if single_process and not m.is_lora and m.trainable:
            param_bytes = _load_bytes(ctx, True)
        elif single_process and m.is_lora and m.quantized:
            param_bytes = ctx.request.quantized_adapter_bytes
        if param_bytes != 4:
            state_bytes = mem.optimizer_state_bytes(ctx.request.optimizer, param_bytes)
        if ctx.fp32_embedding_states(m, m_stage, m_offload):
            state_bytes = mem.with_embedding_states(state_bytes, ctx.request.optimizer, m.trainable,
                                                    m.shape.vocab * m.shape.hidden)
        s = mem.model_states(trainable=m.trainable, frozen_bytes=m.frozen_bytes, precision=ctx.precision,
                             state_bytes=state_bytes, param_bytes=param_bytes, zero_stage=m_stage, dp=ctx.dp,
                             offload_optimizer=m_offload != "none", offload_param=m_offload == "all",
                             largest_layer=m.shape.largest_layer_params if m_stage == 3 else 0,
                             gathered=mem.zero3_gathered_bytes(m.trainable * e + m.frozen_bytes,
                                                               m.shape.largest_layer_params, e,
                                                               backward=m.trainable > 0) if m_stage == 3 else None,
                             step_temp_bytes=mem.optimizer_step_temp_bytes(ctx.request.optimizer)
                             if (not single_process or ctx.inventory.device == "cuda") else 0.0,
                             deepspeed=not single_process)
        if hpz and m_stage == 3:  # ZeRO++ keeps a secondary 16-bit copy partitioned within the node
            s.weights += (m.trainable * 2 + m.frozen_bytes) / ctx.inventory.ranks_per_node
        total = total + s
        load += mem.load_bytes_per_rank(m.shape.num_params, m_stage, m.quantized,
                                        _load_bytes(ctx, single_process and m.trainable and not m.is_lora))
        # Frozen models follow TRL's prepare_deepspeed: ZeRO-3 inference (partitioned) under stage 3, else a
        # replicated copy per rank; the search over stages is what picks whichever fits.
        placement = "partitioned" if m_stage == 3 else ("replicated" if not m.trainable else
                                                      f"ZeRO-{m_stage}" if m_stage else "replicated (DDP)")
        per_model[m.role] = {"name": m.shape.name, "params": m.shape.num_params, "trainable_params": m.trainable,
                             "quantized": m.quantized, "placement": placement,
                             "weights": int(s.weights), "gradients": int(s.gradients), "optimizer": int(s.optimizer),
                             "host": int(s.host)}
        if m.is_lora:
            per_model[m.role]["frozen_base"] = "partitioned (ZeRO-3)" if m_stage == 3 else "replicated"
    if any(x.role == "reference" for x in ctx.request.extra_models) and ctx.request.method != "full":
        per_model["reference"] = {"name": ctx.shape.name, "placement": "policy with adapter disabled",
                                  "params": 0, "trainable_params": 0, "weights": 0, "gradients": 0, "optimizer": 0,
                                  "host": 0}
    return total, per_model, total.host, load


def _activations(ctx: "_Context", checkpointing: bool, micro: int,
                 single_process: bool) -> tuple[float, float, float]:
    """(bytes held for backward at the training peak, bytes beside them that backward does not free (PPO's rollout
    logits), bytes held while sampling a rollout: PPO/GRPO, else 0)."""
    req = ctx.request
    micro = ctx.train_rows(micro)
    # Without autocast (one process, request.autocast False) PEFT feeds its fp32 adapters fp32 copies of their
    # inputs; DeepSpeed's bf16 engine holds the adapters in 16-bit like everything else.
    lora_bytes = 4 if (single_process and not req.autocast) else None
    held = 0.0
    for m in ctx.models:
        if not m.trainable:
            continue
        policy = m.role == "policy"
        lora_r = req.lora_r if (policy and m.is_lora and req.trainable_params is None) else 0
        act = mem.activation_bytes(m.shape, seq_len=req.seq_len, micro_batch=micro, checkpointing=checkpointing,
                                   precision=ctx.precision, attention=req.attention, lora_r=lora_r,
                                   lora_targets=req.lora_targets, sequences=req.sequences_per_example,
                                   lora_dropout=req.lora_dropout if lora_r else 0.0, device=ctx.inventory.device,
                                   trainable_base=not m.is_lora, quantized=m.quantized,
                                   lora_input_bytes=lora_bytes)
        if (single_process and req.autocast and not m.is_lora and ctx.precision != "fp32"
                and _load_bytes(ctx, True) == 4):
            # fp32 weights under 16-bit autocast: each linear's 16-bit copy of its weight is saved for backward
            act += mem.ELEMENT_BYTES[ctx.precision] * m.shape.layers * m.shape.linear_params_per_layer
        head = _head_weight_bytes(ctx, m, single_process)
        act += mem.logits_bytes(m.shape, seq_len=req.seq_len, micro_batch=micro, precision=ctx.precision,
                                sequences=req.sequences_per_example, lm_head=policy and not m.shape.score_head,
                                chunk_tokens=req.loss_chunk_tokens if policy else 0, head_bytes=head,
                                per_logit=req.logit_bytes, logit_tokens=req.logit_tokens)
        held += act  # PPO's policy and value model run in one forward and one backward (TRL's PolicyAndValueWrapper)
    if req.keeps_rollout_logits:  # PPO
        kept, sampling = mem.ppo_rollout_bytes(ctx.shape, rank_batch=ctx.per_rank_batch, micro_batch=micro,
                                               response_tokens=req.generated_tokens,
                                               prompt_tokens=req.seq_len - req.generated_tokens,
                                               precision=ctx.precision, chunk=req.rollout_chunk)
        return held, kept, sampling
    if req.generates:
        sampled = ctx.per_rank_batch if req.generates_rank_batch else micro
        return held, 0.0, mem.kv_cache_bytes(ctx.shape, seq_len=req.seq_len, micro_batch=sampled,
                                             precision=ctx.precision)
    return held, 0.0, 0.0
