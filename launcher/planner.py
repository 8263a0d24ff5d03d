"""Choose ZeRO stage, offload, gradient checkpointing and micro-batch for a recipe on an inventory. Pure; no torch.

Search: every ZeRO stage {0,1,2,3} x offload {none, optimizer, all (ZeRO-3 only)} x checkpointing x micro-batch
(powers of two dividing the per-rank batch) x ZeRO++ hierarchical partitioning (multi-node ZeRO-3). A plan fits
when its predicted peak per rank <= memory_fraction x capacity (and, with offload, the node's host RAM holds the
offloaded states). Among those that fit, the lowest predicted step time wins (see `step_seconds`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from launcher import memory as mem
from launcher.errors import UserError
from launcher.inventory import CPU_TFLOPS, Inventory
from launcher.shapes import ModelShape, resolve_shape

GiB = mem.GiB
METHODS = ("full", "lora", "qlora")
OFFLOADS = ("none", "optimizer", "all")
PCIE_BYTES_PER_S = 12e9  # host <-> GPU, effective
CPU_OPTIMIZER_BYTES_PER_S = 5e9  # torch AdamW on host tensors is memory-bound (~20 B touched per param)
CPU_COMM_BYTES_PER_S = 2e9  # gloo between CPU ranks


@dataclass
class ExtraModel:
    """Another model the recipe holds (PPO: reference, reward, value; DPO: reference)."""

    role: str  # 'reference' | 'reward' | 'value'
    shape: ModelShape
    trainable: bool = False
    quantized: bool = False


@dataclass
class PlanRequest:
    shape: Optional[ModelShape] = None
    method: str = "full"  # 'full' | 'lora' | 'qlora'
    seq_len: int = 2048
    global_batch_size: int = 16
    lora_r: int = 16
    lora_targets: object = "all-linear"
    trainable_params: Optional[int] = None  # overrides the LoRA count (prompt / prefix tuning)
    optimizer: str = "adamw_torch"  # HF `optim` name
    zero_stage: Optional[int] = None  # pins; None = search
    offload: Optional[str] = None
    micro_batch_size: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    memory_fraction: float = 0.9
    attention: str = "sdpa"  # 'sdpa' (also flash) | 'eager'
    extra_models: list = field(default_factory=list)
    sequences_per_example: int = 1  # 2 for preference pairs (DPO, reward modelling)
    generates: bool = False  # PPO/GRPO rollouts keep a KV cache
    lm_head: bool = True  # False for sequence-classification heads: no vocab-sized logits
    notes: list = field(default_factory=list)


@dataclass
class Plan:
    fits: bool
    reason: str
    method: str
    device: str
    precision: str
    world_size: int
    nodes: int
    gpus_per_node: int
    seq_len: int
    global_batch_size: int
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    zero_hpz_partition_size: Optional[int] = None
    bnb_4bit_quant_storage: Optional[str] = None
    per_gpu_bytes: dict = field(default_factory=dict)
    capacity_bytes: int = 0
    usable_bytes: int = 0
    host_bytes_per_node: int = 0
    host_capacity_bytes: Optional[int] = None
    predicted_step_seconds: Optional[float] = None
    model: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    bucket_elements: int = 0
    hidden_size: int = 0

    @property
    def offload(self) -> str:
        return "all" if self.offload_param else "optimizer" if self.offload_optimizer else "none"

    def to_json(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["offload"] = self.offload
        return out


@dataclass
class _Model:
    role: str
    shape: ModelShape
    trainable: int
    frozen_params: int
    frozen_bytes: float
    quantized: bool
    is_lora: bool


@dataclass
class _Context:
    """Everything fixed for one (request, inventory): computed once, reused by every candidate."""

    request: PlanRequest
    inventory: Inventory
    shape: ModelShape
    precision: str
    dp: int
    per_rank_batch: int
    capacity: int
    usable: float
    host_capacity: Optional[float]
    state_bytes: float
    models: list
    cache: dict = field(default_factory=dict)


@dataclass
class _Result:
    stage: int
    offload: str
    checkpointing: bool
    micro: int
    hpz: bool
    parts: dict
    host: float
    models: dict
    seconds: float
    gpu_ok: bool
    host_ok: bool

    @property
    def fits(self) -> bool:
        return self.gpu_ok and self.host_ok

    def label(self) -> dict:
        out = {"zero_stage": self.stage, "offload": self.offload, "gradient_checkpointing": self.checkpointing,
               "micro_batch_size": self.micro}
        if self.hpz:
            out["zero_hpz"] = True
        return out


def choose_precision(inventory: Inventory) -> tuple[str, str]:
    if inventory.gpu is None:
        return "fp32", "precision fp32: CPU ranks"
    cc = inventory.gpu.compute_capability
    if tuple(cc) >= (8, 0):
        return "bf16", f"precision bf16: every GPU has compute capability >= 8.0 ({cc[0]}.{cc[1]})"
    return "fp16", (f"precision fp16 with dynamic loss scaling: {inventory.gpu.name} (compute capability "
                    f"{cc[0]}.{cc[1]}) has no bf16")


def _models(request: PlanRequest, shape: ModelShape, e: int) -> list[_Model]:
    method = request.method
    if method == "full":
        trainable = shape.num_params
    elif request.trainable_params is not None:
        trainable = request.trainable_params
    else:
        trainable = mem.lora_params(shape, request.lora_r, request.lora_targets)
    frozen = shape.num_params if method != "full" else 0
    out = [_Model("policy", shape, trainable, frozen,
                  mem.frozen_weight_bytes(shape, frozen, e, method == "qlora") if frozen else 0.0,
                  method == "qlora", method != "full")]
    for extra in request.extra_models:
        if extra.role == "reference" and method != "full":
            continue  # the policy with its adapter disabled: costs nothing
        s = extra.shape
        if extra.trainable:
            out.append(_Model(extra.role, s, s.num_params, 0, 0.0, False, False))
        else:
            out.append(_Model(extra.role, s, 0, s.num_params,
                              mem.frozen_weight_bytes(s, s.num_params, e, extra.quantized), extra.quantized, False))
    return out


def _context(request: PlanRequest, inventory: Inventory, shape: ModelShape) -> _Context:
    if request.method not in METHODS:
        raise UserError(f"method '{request.method}': expected one of {', '.join(METHODS)}")
    dp = inventory.world_size
    if request.global_batch_size < 1 or request.global_batch_size % dp:
        raise UserError(f"plan.global_batch_size={request.global_batch_size} is not a multiple of the {dp} "
                        f"data-parallel rank(s); use a multiple of {dp}")
    if request.seq_len < 1:
        raise UserError(f"seq_len {request.seq_len}: must be positive")
    if not 0 < request.memory_fraction <= 1:
        raise UserError(f"plan.memory_fraction={request.memory_fraction}: must be in (0, 1]")
    precision, _ = choose_precision(inventory)
    capacity = inventory.capacity_per_rank
    if inventory.gpu is not None and capacity <= 0:
        raise UserError("GPU memory unknown for this allocation; pass --inventory, e.g. 8xA100-80GB")
    host = None
    if inventory.gpu is not None and (inventory.host_free_bytes or inventory.host_ram_bytes):
        host = request.memory_fraction * (inventory.host_free_bytes or inventory.host_ram_bytes)
    e = mem.ELEMENT_BYTES[precision]
    return _Context(request, inventory, shape, precision, dp, request.global_batch_size // dp, capacity,
                    request.memory_fraction * capacity, host, mem.optimizer_state_bytes(request.optimizer),
                    _models(request, shape, e))


def evaluate(ctx: _Context, stage: int, offload: str, checkpointing: bool, micro: int, hpz: bool) -> _Result:
    """Predicted per-rank bytes, host bytes per node and step time of one candidate."""
    req, inv = ctx.request, ctx.inventory
    key = (stage, offload, hpz)
    if key not in ctx.cache:
        ctx.cache[key] = _states(ctx, stage, offload, hpz)
    states, models, host_per_rank, load = ctx.cache[key]
    akey = (checkpointing, micro)
    if akey not in ctx.cache:
        ctx.cache[akey] = _activations(ctx, checkpointing, micro)
    activations = ctx.cache[akey]
    fixed = mem.runtime_bytes(device=inv.device, zero_stage=stage, hidden=ctx.shape.hidden,
                              precision=ctx.precision, dp=ctx.dp)
    dynamic = states.gpu + activations
    parts = {"weights": int(states.weights), "gradients": int(states.gradients), "optimizer": int(states.optimizer),
             "activations": int(activations), "other": int(fixed + mem.FRAGMENTATION * dynamic)}
    parts["total"] = sum(parts.values())
    host = mem.host_bytes_per_node(ranks_per_node=inv.ranks_per_node, offloaded_per_rank=host_per_rank,
                                   load_per_rank=load) if inv.device == "cuda" else parts["total"] * inv.ranks_per_node
    host_ok = ctx.host_capacity is None or host <= ctx.host_capacity
    seconds = step_seconds(ctx, stage, offload, checkpointing, micro, hpz)
    return _Result(stage, offload, checkpointing, micro, hpz, parts, host, models, seconds,
                   parts["total"] <= ctx.usable, host_ok)


def _states(ctx: _Context, stage: int, offload: str, hpz: bool):
    total = mem.ModelStates()
    per_model = {}
    # One rank, no ZeRO, no offload: `python launcher/run.py` without DeepSpeed, plain torch autocast.
    single_process = ctx.dp == 1 and stage == 0 and offload == "none"
    load = 0.0
    for m in ctx.models:
        s = mem.model_states(trainable=m.trainable, frozen_bytes=m.frozen_bytes, precision=ctx.precision,
                             state_bytes=ctx.state_bytes, zero_stage=stage, dp=ctx.dp,
                             offload_optimizer=offload != "none", offload_param=offload == "all",
                             largest_layer=m.shape.largest_layer_params if stage == 3 else 0,
                             deepspeed=not single_process)
        if hpz and stage == 3:  # ZeRO++ keeps a secondary 16-bit copy partitioned within the node
            s.weights += (m.trainable * 2 + m.frozen_bytes) / ctx.inventory.ranks_per_node
        total = total + s
        load += mem.load_bytes_per_rank(m.shape.num_params, stage, m.quantized)
        # Frozen models follow TRL's prepare_deepspeed: ZeRO-3 inference (partitioned) under stage 3, else a
        # replicated copy per rank; the search over stages is what picks whichever fits.
        placement = "partitioned" if stage == 3 else ("replicated" if not m.trainable else
                                                      f"ZeRO-{stage}" if stage else "replicated (DDP)")
        per_model[m.role] = {"name": m.shape.name, "params": m.shape.num_params, "trainable_params": m.trainable,
                             "quantized": m.quantized, "placement": placement,
                             "weights": int(s.weights), "gradients": int(s.gradients), "optimizer": int(s.optimizer),
                             "host": int(s.host)}
        if m.is_lora:
            per_model[m.role]["frozen_base"] = "partitioned (ZeRO-3)" if stage == 3 else "replicated"
    if any(x.role == "reference" for x in ctx.request.extra_models) and ctx.request.method != "full":
        per_model["reference"] = {"name": ctx.shape.name, "placement": "policy with adapter disabled",
                                  "params": 0, "trainable_params": 0, "weights": 0, "gradients": 0, "optimizer": 0,
                                  "host": 0}
    return total, per_model, total.host, load


def _activations(ctx: _Context, checkpointing: bool, micro: int) -> float:
    req = ctx.request
    peak = 0.0
    for m in ctx.models:
        if not m.trainable:
            continue
        policy = m.role == "policy"
        lora_r = req.lora_r if (policy and m.is_lora and req.trainable_params is None) else 0
        act = mem.activation_bytes(m.shape, seq_len=req.seq_len, micro_batch=micro, checkpointing=checkpointing,
                                   precision=ctx.precision, attention=req.attention, lora_r=lora_r,
                                   lora_targets=req.lora_targets, sequences=req.sequences_per_example)
        act += mem.logits_bytes(m.shape, seq_len=req.seq_len, micro_batch=micro, precision=ctx.precision,
                                sequences=req.sequences_per_example, lm_head=req.lm_head and policy)
        peak = max(peak, act)  # several trainable models train one after another (PPO: policy, then value)
    if req.generates:
        peak = max(peak, mem.kv_cache_bytes(ctx.shape, seq_len=req.seq_len, micro_batch=micro,
                                            precision=ctx.precision))
    return peak


def step_seconds(ctx: _Context, stage: int, offload: str, checkpointing: bool, micro: int, hpz: bool) -> float:
    """Predicted seconds per optimizer step. Relative, not absolute: it only has to rank candidates.

    compute: 6 FLOPs/param/token to train, 4 when only activation grads flow (frozen base), 2 for frozen
    models' forward; recompute adds one forward; efficiency grows with tokens per micro-batch (small kernels starve).
    communication: ZeRO-0/1 all-reduce gradients once per step; ZeRO-2 reduce-scatters every micro-step;
    ZeRO-3 also all-gathers weights for forward, backward (and recompute) every micro-step. Half is hidden behind
    compute. Offload adds PCIe traffic and a host optimizer step; parameter offload streams weights every pass.
    """
    req, inv = ctx.request, ctx.inventory
    accum = ctx.per_rank_batch // micro
    tokens = ctx.per_rank_batch * req.seq_len * req.sequences_per_example
    flops = 0.0
    for m in ctx.models:
        params = m.shape.num_params
        if m.trainable and not m.is_lora:
            per_token = 6 * params + (2 * params if checkpointing else 0)
        elif m.trainable:
            per_token = 4 * params + (2 * params if checkpointing else 0)
        else:
            per_token = 2 * params
        flops += per_token * tokens
    micro_tokens = micro * req.seq_len * req.sequences_per_example
    efficiency = 0.5 * micro_tokens / (micro_tokens + 1024)
    if inv.gpu is not None:
        model = inv.gpu.model
        peak, intra, inter = model.tflops16 * 1e12, model.intra_node_gbps * 1e9, model.inter_node_gbps * 1e9
    else:
        peak, intra, inter = CPU_TFLOPS * 1e12, CPU_COMM_BYTES_PER_S, CPU_COMM_BYTES_PER_S
    compute = flops / (peak * efficiency) * (1.05 if stage == 3 else 1.0)  # ZeRO-3 hooks cost a little
    comm = 0.0
    gathered = sum(m.trainable * 2 + m.frozen_bytes for m in ctx.models)
    grads = sum(m.trainable for m in ctx.models) * 2.0
    if ctx.dp > 1:
        bw = inter if inv.nodes > 1 else intra
        if stage <= 1:
            comm = 2 * grads / bw
        elif stage == 2:
            comm = (accum * grads + grads) / bw
        else:
            passes = 3 if checkpointing else 2
            gather_bw = intra if hpz else bw
            comm = accum * (passes * gathered / gather_bw + grads / bw)
    offload_time = 0.0
    trainable_share = sum(m.trainable for m in ctx.models) / ctx.dp
    if offload != "none" and inv.gpu is not None:
        offload_time += trainable_share * 20 / CPU_OPTIMIZER_BYTES_PER_S + trainable_share * 6 / PCIE_BYTES_PER_S
        if offload == "all":
            offload_time += accum * (3 if checkpointing else 2) * gathered / ctx.dp / PCIE_BYTES_PER_S
    return compute + 0.5 * comm + offload_time + 1e-6 * stage  # prefer the simpler stage on ties


def _micro_batches(ctx: _Context) -> list[int]:
    n = ctx.per_rank_batch
    pinned = ctx.request.micro_batch_size
    if pinned is not None:
        if pinned < 1 or n % pinned:
            raise UserError(f"plan.micro_batch_size={pinned} does not divide the per-rank batch {n} "
                            f"(plan.global_batch_size={ctx.request.global_batch_size} / {ctx.dp} ranks)")
        return [pinned]
    out, m = [], 1
    while m <= n:
        if n % m == 0:
            out.append(m)
        m *= 2
    if n not in out:
        out.append(n)
    return out


def _configs(ctx: _Context) -> list[tuple]:
    req, inv = ctx.request, ctx.inventory
    stages = [req.zero_stage] if req.zero_stage is not None else [0, 1, 2, 3]
    if any(s not in (0, 1, 2, 3) for s in stages):
        raise UserError(f"plan.zero_stage={req.zero_stage}: must be 0, 1, 2 or 3")
    if req.offload is not None and req.offload not in OFFLOADS:
        raise UserError(f"plan.offload={req.offload}: must be none, optimizer or all")
    if req.offload not in (None, "none") and inv.gpu is None:
        raise UserError(f"plan.offload={req.offload}: CPU ranks already hold everything in host RAM; use none")
    if req.offload == "all" and req.zero_stage is not None and req.zero_stage != 3:
        raise UserError(f"plan.offload=all offloads parameters, which needs ZeRO-3 (plan.zero_stage="
                        f"{req.zero_stage})")
    if req.offload == "optimizer" and req.zero_stage == 0:
        raise UserError("plan.offload=optimizer needs ZeRO-1 or higher (plan.zero_stage=0)")
    gcs = [req.gradient_checkpointing] if req.gradient_checkpointing is not None else [False, True]
    cpu_optimizer = optimizer_runs_on_cpu(req.optimizer)
    out, skipped = [], []
    for stage in stages:
        offloads = [req.offload] if req.offload is not None else (["none"] if inv.gpu is None else list(OFFLOADS))
        for offload in offloads:
            if (offload == "all" and stage != 3) or (offload == "optimizer" and stage == 0):
                continue
            label = {"zero_stage": stage, "offload": offload}
            if offload != "none" and not cpu_optimizer:
                skipped.append({"plan": label, "reason": f"optimizer '{req.optimizer}' (bitsandbytes) runs on the "
                                f"GPU only; offload needs a CPU-capable one such as adamw_torch"})
                continue
            if ctx.dp == 1 and stage > 0 and offload == "none" and req.zero_stage is None:
                skipped.append({"plan": label, "reason": "one rank: nothing to partition, same as ZeRO-0"})
                continue
            hpzs = [False, True] if (stage == 3 and inv.nodes > 1 and offload != "all") else [False]
            for gc in gcs:
                for hpz in hpzs:
                    out.append((stage, offload, gc, hpz))
    if not out:
        raise UserError(f"plan.offload={req.offload}: optimizer '{req.optimizer}' (bitsandbytes) runs on the GPU "
                        f"only; use training.optim=adamw_torch to offload")
    return out, skipped


def optimizer_runs_on_cpu(optim: str) -> bool:
    """bitsandbytes optimizers (8-bit, paged) keep their states on the GPU; torch's run anywhere."""
    name = (optim or "").lower()
    return not any(tag in name for tag in ("8bit", "paged", "bnb"))


def _search(ctx: _Context):
    """Best fitting result, the closest miss, and one summary per configuration."""
    micros = _micro_batches(ctx)
    best, closest, per_config = None, None, []
    configs, skipped = _configs(ctx)
    for stage, offload, gc, hpz in configs:
        config_best, first_miss = None, None
        for micro in micros:  # peak grows with micro-batch: stop at the first miss
            result = evaluate(ctx, stage, offload, gc, micro, hpz)
            if not result.fits:
                first_miss = result
                if closest is None or _shortfall(ctx, result) < _shortfall(ctx, closest):
                    closest = result
                break
            if config_best is None or result.seconds < config_best.seconds:
                config_best = result
        per_config.append((config_best, first_miss))
        if config_best is not None and (best is None or config_best.seconds < best.seconds):
            best = config_best
    return best, closest, per_config, skipped


def _shortfall(ctx: _Context, result: _Result) -> float:
    """How far a miss is from fitting, as a fraction of what is usable (GPU or host, whichever is worse)."""
    gpu = (result.parts["total"] - ctx.usable) / ctx.usable
    host = (result.host - ctx.host_capacity) / ctx.host_capacity if ctx.host_capacity else 0.0
    return max(gpu, host)


def _miss_reason(ctx: _Context, result: _Result) -> str:
    parts = []
    if not result.gpu_ok:
        parts.append(f"needs {mem.fmt_bytes(result.parts['total'])} per {_unit(ctx)} > usable "
                     f"{mem.fmt_bytes(ctx.usable)} (short by {mem.fmt_bytes(result.parts['total'] - ctx.usable)})")
    if not result.host_ok:
        parts.append(f"needs {mem.fmt_bytes(result.host)} host RAM per node > usable "
                     f"{mem.fmt_bytes(ctx.host_capacity)} (short by {mem.fmt_bytes(result.host - ctx.host_capacity)})")
    return " and ".join(parts)


def _unit(ctx: _Context) -> str:
    return "GPU" if ctx.inventory.gpu is not None else "CPU rank"


def _describe(result: _Result) -> str:
    offload = {"none": "", "optimizer": " + optimizer offload", "all": " + optimizer & parameter offload"}
    return (f"ZeRO-{result.stage}{offload[result.offload]}{' + hpZ' if result.hpz else ''}, checkpointing "
            f"{'on' if result.checkpointing else 'off'}, micro-batch {result.micro}")


def plan(request: PlanRequest, inventory: Inventory, shape: Optional[ModelShape] = None,
         suggest: bool = True) -> Plan:
    """The fastest plan that fits, or fits=False with by how much it misses and what would fit."""
    shape = shape or request.shape
    if shape is None:
        raise UserError("plan: no model shape given")
    ctx = _context(request, inventory, shape)
    best, closest, per_config, skipped = _search(ctx)
    chosen = best or closest
    if chosen is None:  # every configuration was pinned away (cannot happen with valid pins)
        raise UserError("plan: the pins leave no configuration to evaluate")
    precision, precision_reason = choose_precision(inventory)
    inv = inventory
    result = Plan(
        fits=best is not None, reason="", method=request.method, device=inv.device, precision=precision,
        world_size=inv.world_size, nodes=inv.nodes, gpus_per_node=inv.ranks_per_node, seq_len=request.seq_len,
        global_batch_size=request.global_batch_size, zero_stage=chosen.stage,
        offload_optimizer=chosen.offload != "none", offload_param=chosen.offload == "all",
        micro_batch_size=chosen.micro, gradient_accumulation_steps=ctx.per_rank_batch // chosen.micro,
        gradient_checkpointing=chosen.checkpointing,
        zero_hpz_partition_size=inv.ranks_per_node if chosen.hpz else None,
        bnb_4bit_quant_storage=({"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
                                if request.method == "qlora" and chosen.stage == 3 else None),
        per_gpu_bytes=chosen.parts, capacity_bytes=int(ctx.capacity), usable_bytes=int(ctx.usable),
        host_bytes_per_node=int(chosen.host),
        host_capacity_bytes=int(ctx.host_capacity) if ctx.host_capacity else None,
        predicted_step_seconds=round(chosen.seconds, 4) if best is not None else None,
        model={"name": shape.name, "params": shape.num_params, "trainable_params": ctx.models[0].trainable,
               "optimizer": request.optimizer, "inventory": inv.describe()},
        models=chosen.models, bucket_elements=mem.bucket_elements(shape.hidden), hidden_size=shape.hidden)
    reasons = list(request.notes) + list(inv.notes) + [precision_reason]
    reasons.append(f"usable memory per {_unit(ctx)}: {request.memory_fraction:g} x {mem.fmt_bytes(ctx.capacity)}"
                   f" = {mem.fmt_bytes(ctx.usable)}")
    pins = {k: getattr(request, k) for k in ("zero_stage", "offload", "micro_batch_size", "gradient_checkpointing")
            if getattr(request, k) is not None}
    if pins:
        reasons.append("pinned: " + ", ".join(f"plan.{k}={v}" for k, v in pins.items()))
    if best is not None:
        reasons += _explain(ctx, best, per_config)
        result.reason = f"fits: {_describe(best)}, {mem.fmt_bytes(best.parts['total'])} of " \
                        f"{mem.fmt_bytes(ctx.usable)} usable per {_unit(ctx)}"
    else:
        what = "the pinned plan" if pins else "the closest plan"
        result.reason = f"{what} ({_describe(closest)}) {_miss_reason(ctx, closest)}"
        if suggest:
            ideas = _suggestions(request, inventory, shape, pins)
            result.reason += "; " + ("would fit: " + "; ".join(ideas) if ideas else "nothing nearby fits")
        reasons.append(result.reason)
    result.reasons = reasons
    result.rejected = _rejections(ctx, best, per_config) + skipped
    return result


def estimate(request: PlanRequest, inventory: Inventory, shape: ModelShape, *, zero_stage: int, offload: str,
             gradient_checkpointing: bool, micro_batch_size: int, hpz: bool = False) -> dict:
    """One configuration's prediction, no search: per-rank bytes, host bytes per node, step seconds, fits."""
    ctx = _context(request, inventory, shape)
    r = evaluate(ctx, zero_stage, offload, gradient_checkpointing, micro_batch_size, hpz)
    return {"per_gpu_bytes": dict(r.parts), "host_bytes_per_node": r.host, "step_seconds": r.seconds,
            "fits": r.fits, "models": r.models, "usable_bytes": ctx.usable}


def _explain(ctx: _Context, best: _Result, per_config) -> list[str]:
    out = [f"chosen {_describe(best)}: the fastest plan that fits (predicted {best.seconds:.3g} s/step)"]
    accum = ctx.per_rank_batch // best.micro
    out.append(f"batch: micro-batch {best.micro} x accumulation {accum} x {ctx.dp} rank(s) = global "
               f"{ctx.request.global_batch_size}")
    if best.stage == 3 and ctx.request.method != "full":
        out.append("ZeRO-3 partitions the frozen base weights across ranks too")
    if best.hpz:
        out.append(f"ZeRO++ hpZ: a secondary weight copy within each node ({ctx.inventory.ranks_per_node} GPUs) "
                   f"keeps the weight all-gathers off the network")
    if ctx.request.method == "qlora" and best.stage == 3:
        out.append("QLoRA under ZeRO-3: bnb_4bit_quant_storage = the compute dtype so the 4-bit weights shard")
    if best.offload != "none":
        out.append(f"offload: host RAM needed per node {mem.fmt_bytes(best.host)}")
    return out


def _rejections(ctx: _Context, best: Optional[_Result], per_config) -> list[dict]:
    out = []
    for config_best, first_miss in per_config:
        if config_best is not None and config_best is not best:
            out.append({"plan": config_best.label(), "reason": f"slower: predicted {config_best.seconds:.3g} "
                        f"s/step vs {best.seconds:.3g}" if best else "slower"})
        if first_miss is not None and (config_best is None or config_best is best):
            out.append({"plan": first_miss.label(), "reason": "does not fit: " + _miss_reason(ctx, first_miss)})
    return out


def _suggestions(request: PlanRequest, inventory: Inventory, shape: ModelShape, pins: dict) -> list[str]:
    """Nearby requests that would fit: without pins, a lighter method, more GPUs, a shorter sequence."""
    from dataclasses import replace

    def fits(req: PlanRequest, inv: Inventory = inventory) -> Optional[Plan]:
        try:
            p = plan(req, inv, shape, suggest=False)
        except UserError:
            return None
        return p if p.fits else None

    ideas = []
    if pins:
        free = replace(request, zero_stage=None, offload=None, micro_batch_size=None, gradient_checkpointing=None)
        p = fits(free)
        if p:
            ideas.append(f"without the pins (ZeRO-{p.zero_stage}, offload {p.offload})")
    for lighter in {"full": ["lora", "qlora"], "lora": ["qlora"]}.get(request.method, []):
        if shape.arch == "decoder" and fits(replace(request, method=lighter, trainable_params=None)):
            ideas.append(f"{'QLoRA' if lighter == 'qlora' else 'LoRA'} instead of {request.method}")
            break
    if inventory.gpu is not None:
        for factor in (2, 4, 8, 16, 32, 64):
            inv = _scaled(inventory, factor)
            dp = inv.world_size
            batch = -(-request.global_batch_size // dp) * dp
            if fits(replace(request, global_batch_size=batch), inv):
                nodes = f"{inv.nodes}x" if inv.nodes > 1 else ""
                ideas.append(f"{nodes}{inv.ranks_per_node}x{inv.gpu.name}-{inv.gpu.total_bytes / GiB:.0f}GB")
                break
    seq = request.seq_len // 2
    while seq >= 64:
        if fits(replace(request, seq_len=seq)):
            ideas.append(f"seq_len {seq}")
            break
        seq //= 2
    return ideas


def _scaled(inventory: Inventory, factor: int) -> Inventory:
    """factor x the GPUs: fill one node up to 8, then add 8-GPU (or same-size) nodes."""
    from dataclasses import replace

    target = inventory.world_size * factor
    if inventory.nodes == 1 and target <= 8:
        return replace(inventory, ranks_per_node=target, notes=[])
    per_node = max(inventory.ranks_per_node, 8)
    return replace(inventory, nodes=max(1, target // per_node), ranks_per_node=per_node, notes=[])


# ---------------------------------------------------------------- recipes

def request_from_recipe(cfg) -> PlanRequest:
    """The lead's RecipeConfig (read by attribute) -> PlanRequest, policy shape resolved offline."""
    notes = []
    if cfg.method == "qlora" or cfg.quant.load_in_4bit:
        method = "qlora"
    elif cfg.peft.method != "none":
        method = "lora"
    else:
        method = "full"
    shape = resolve_shape(cfg.model.name, cfg.model.tiny)
    trainable = None
    peft_method = cfg.peft.method
    if peft_method in ("prompt_tuning", "prefix_tuning"):
        tokens = getattr(cfg.peft, "num_virtual_tokens", 16)
        trainable = tokens * shape.hidden * (2 * shape.layers if peft_method == "prefix_tuning" else 1)
        notes.append(f"{peft_method}: {trainable} trainable parameters")
    plan_cfg = cfg.plan
    attention = "eager" if (getattr(cfg.model, "attn_implementation", None) or "sdpa") == "eager" else "sdpa"
    request = PlanRequest(
        shape=shape, method=method, seq_len=cfg.data.max_length, global_batch_size=plan_cfg.global_batch_size,
        lora_r=cfg.peft.r, lora_targets=cfg.peft.target_modules, trainable_params=trainable,
        optimizer=(cfg.training or {}).get("optim") or "adamw_torch", zero_stage=plan_cfg.zero_stage,
        offload=plan_cfg.offload, micro_batch_size=plan_cfg.micro_batch_size,
        gradient_checkpointing=plan_cfg.gradient_checkpointing, memory_fraction=plan_cfg.memory_fraction,
        attention=attention, sequences_per_example=2 if cfg.method in ("dpo", "rm") else 1,
        generates=cfg.method in ("ppo", "grpo"), lm_head=cfg.method not in ("rm", "classify"), notes=notes)
    reference = ExtraModel("reference", shape, trainable=False, quantized=method == "qlora")
    if cfg.method == "dpo":
        request.extra_models.append(reference)
    elif cfg.method == "grpo" and float(_section(cfg, "grpo").get("beta", 0.0) or 0.0) > 0:
        request.extra_models.append(reference)
    elif cfg.method == "ppo":
        ppo = _section(cfg, "ppo")
        reward = _side_shape(ppo.get("reward_model"), shape, "reward", notes)
        value = _side_shape(ppo.get("value_model") or ppo.get("reward_model"), shape, "value", notes)
        request.extra_models += [reference, ExtraModel("reward", reward), ExtraModel("value", value, trainable=True)]
    return request


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
