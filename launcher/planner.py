"""Choose ZeRO stage, offload, gradient checkpointing and micro-batch for a recipe on an inventory. Pure; no torch.

Search: every ZeRO stage {0,1,2,3} x offload {none, optimizer, all (ZeRO-3 only)} x checkpointing x micro-batch
(powers of two dividing the per-rank batch) x ZeRO++ hierarchical partitioning (multi-node ZeRO-3). A plan fits
when its predicted peak per rank <= memory_fraction x capacity (and, with offload, the node's host RAM holds the
offloaded states). Among those that fit, the lowest predicted step time wins (launcher/cost.py).

What one rank holds at the peak of a candidate: launcher/peak.py (formulas: launcher/memory.py). Explanations of the
choice, rejections and "what would fit" suggestions: launcher/plan_explain.py. From a recipe to a PlanRequest:
launcher/recipe_request.py. The request and plan types: launcher/plan_types.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from launcher import memory as mem
from launcher.errors import UserError
from launcher import peak, plan_explain as explain
from launcher.cost import step_seconds
from launcher.inventory import Inventory
from launcher.plan_types import MIN_MEMORY_FRACTION, OFFLOAD_MARGIN, ExtraModel, Plan, PlanRequest  # noqa: F401  (re-exported: callers import them here)
from launcher.shapes import ModelShape

GiB = mem.GiB
METHODS = ("full", "lora", "qlora")
OFFLOADS = ("none", "optimizer", "all")


@dataclass
class _Model:
    role: str
    shape: ModelShape
    trainable: int
    frozen_params: int
    frozen_bytes: float
    quantized: bool
    is_lora: bool
    replicated: bool = False  # ExtraModel.replicated


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

    def single_process(self, stage: int, offload: str) -> bool:
        """One rank, no ZeRO, no offload, no launcher: `ftlaunch run` without DeepSpeed (torch autocast, unless the
        trainer does without: PlanRequest.autocast)."""
        return not self.request.deepspeed and self.dp == 1 and stage == 0 and offload == "none"

    def train_rows(self, micro: int) -> int:
        """Rows in one forward/backward of training: the micro-batch, or PPO's mini-batch (PlanRequest.mini_batches)."""
        return max(1, micro // self.request.mini_batches)

    def fp32_embedding_states(self, model, stage: int, offload: str) -> bool:
        """`model`'s trained embedding keeps fp32 states (memory.with_embedding_states): a bitsandbytes 8-bit
        optimizer, and one that steps the model's own parameters, since the HF Trainer's override matches them by
        identity: one plain process, or DeepSpeed at stage 0 in fp32 (the engine then uses it unwrapped); ZeRO and
        DeepSpeed's 16-bit optimizers give it flat fp32 partitions."""
        return (model.trainable > 0 and not model.is_lora and mem.is_bnb_8bit(self.request.optimizer)
                and (self.single_process(stage, offload) or (stage == 0 and self.precision == "fp32")))


@dataclass
class _Result:
    stage: int
    offload: str
    checkpointing: bool
    micro: int
    hpz: bool
    parts: dict
    host: float
    load: float  # host bytes per rank while its models load
    models: dict
    seconds: float
    gpu_ok: bool
    host_ok: bool
    peak_at: str = "backward"  # or "rollout" (PPO/GRPO sampling), "optimizer step" (ModelStates.step_gradients)

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
                              mem.frozen_weight_bytes(s, s.num_params, e, extra.quantized), extra.quantized, False,
                              extra.replicated))
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
    if not MIN_MEMORY_FRACTION <= request.memory_fraction <= 1:
        raise UserError(f"plan.memory_fraction={request.memory_fraction}: must be in [{MIN_MEMORY_FRACTION}, 1]")
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
    inv = ctx.inventory
    parts, models, host_per_rank, load, peak_at = peak.peak_parts(ctx, stage, offload, checkpointing, micro, hpz)
    host = mem.host_bytes_per_node(ranks_per_node=inv.ranks_per_node, offloaded_per_rank=host_per_rank,
                                   load_per_rank=load) if inv.device == "cuda" else parts["total"] * inv.ranks_per_node
    host_ok = ctx.host_capacity is None or host <= ctx.host_capacity
    seconds = step_seconds(ctx, stage, offload, checkpointing, micro, hpz)
    return _Result(stage, offload, checkpointing, micro, hpz, parts, host, load, models, seconds,
                   parts["total"] <= ctx.usable, host_ok, peak_at)


def _micro_batches(ctx: _Context) -> list[int]:
    n = ctx.per_rank_batch
    pinned = ctx.request.micro_batch_size
    k = ctx.request.mini_batches
    if k > 1:  # PPO: TRL's loop steps once per mini-batch only without accumulation (PlanRequest.mini_batches)
        if n % k:
            raise UserError(f"ppo.num_mini_batches={k} does not divide the per-rank rollout batch {n} "
                            f"(plan.global_batch_size={ctx.request.global_batch_size} / {ctx.dp} ranks)")
        if pinned not in (None, n):
            raise UserError(f"plan.micro_batch_size={pinned}: with ppo.num_mini_batches={k} PPO trains without "
                            f"accumulation (micro-batch = the per-rank batch {n}, {n // k} rows per backward); "
                            f"remove the pin, or set ppo.num_mini_batches=1 to accumulate micro-batches")
        return [n]
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
    plain = [c for c, _ in per_config if c is not None and c.offload == "none"]
    if best is not None and best.offload != "none" and plain:
        fastest_plain = min(plain, key=lambda c: c.seconds)
        if fastest_plain.seconds <= best.seconds * OFFLOAD_MARGIN:
            best = fastest_plain
    return best, closest, per_config, skipped


def _shortfall(ctx: _Context, result: _Result) -> tuple:
    """How far a miss is from fitting, as a fraction of what is usable: GPU or host, whichever is worse, then the
    two together (a plan short of host RAM alone is closer than one short of the same and of GPU memory too)."""
    gpu = (result.parts["total"] - ctx.usable) / ctx.usable
    host = (result.host - ctx.host_capacity) / ctx.host_capacity if ctx.host_capacity else 0.0
    return max(gpu, host), max(gpu, 0.0) + max(host, 0.0)


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
        bnb_4bit_quant_storage=(mem.PRECISION_DTYPES[precision]
                                if request.method == "qlora" and chosen.stage == 3 else None),
        per_gpu_bytes=chosen.parts, capacity_bytes=int(ctx.capacity), usable_bytes=int(ctx.usable),
        host_bytes_per_node=int(chosen.host), load_bytes_per_rank=int(chosen.load),
        host_capacity_bytes=int(ctx.host_capacity) if ctx.host_capacity else None,
        predicted_step_seconds=round(chosen.seconds, 4) if best is not None else None,
        model={"name": shape.name, "params": shape.num_params, "trainable_params": ctx.models[0].trainable,
               "optimizer": request.optimizer, "inventory": inv.describe()},
        models=chosen.models, bucket_elements=mem.bucket_elements(shape.hidden), hidden_size=shape.hidden,
        single_process=ctx.single_process(chosen.stage, chosen.offload), peak_at=chosen.peak_at)
    reasons = list(request.notes) + list(inv.notes) + [precision_reason]
    reasons.append(f"usable memory per {explain.unit(ctx)}: {request.memory_fraction:g} x {mem.fmt_bytes(ctx.capacity)}"
                   f" = {mem.fmt_bytes(ctx.usable)}")
    embeddings = [m for m in ctx.models if ctx.fp32_embedding_states(m, chosen.stage, chosen.offload)]
    if embeddings:
        reasons.append(f"optimizer {request.optimizer}: the embedding of " + ", ".join(
            f"the {m.role} ({m.shape.vocab * m.shape.hidden / 1e6:.0f}M parameters)" for m in embeddings)
            + " keeps fp32 states (the HF Trainer's 32-bit override for nn.Embedding)")
    pins = {k: getattr(request, k) for k in ("zero_stage", "offload", "micro_batch_size", "gradient_checkpointing")
            if getattr(request, k) is not None}
    for label, chosen_by in (("pinned", lambda k: k not in request.kept),
                             ("kept, not pinned (see above)", lambda k: k in request.kept)):
        named = [f"plan.{k}={v}" for k, v in pins.items() if chosen_by(k)]
        if named:
            reasons.append(f"{label}: " + ", ".join(named))
    if best is not None:
        reasons += explain.explain(ctx, best, per_config)
        result.reason = f"fits: {explain.describe(best)}, {mem.fmt_bytes(best.parts['total'])} of " \
                        f"{mem.fmt_bytes(ctx.usable)} usable per {explain.unit(ctx)}"
        if suggest and any(k not in request.kept for k in pins):
            reasons.append(explain.pin_cost(best, plan(explain.unpinned(request), inventory, shape, suggest=False)))
    else:
        what = "the pinned plan" if pins else "the closest plan"
        result.reason = f"{what} ({explain.describe(closest)}) {explain.miss_reason(ctx, closest)}"
        if suggest:
            ideas = explain.suggestions(request, inventory, shape, pins)
            result.reason += "; " + ("would fit: " + "; ".join(ideas) if ideas else "nothing nearby fits")
        reasons.append(result.reason)
    result.reasons = reasons
    result.rejected = explain.rejections(ctx, best, per_config) + skipped
    return result


def estimate(request: PlanRequest, inventory: Inventory, shape: ModelShape, *, zero_stage: int, offload: str,
             gradient_checkpointing: bool, micro_batch_size: int, hpz: bool = False) -> dict:
    """One configuration's prediction, no search: per-rank bytes, host bytes per node, step seconds, fits."""
    ctx = _context(request, inventory, shape)
    r = evaluate(ctx, zero_stage, offload, gradient_checkpointing, micro_batch_size, hpz)
    return {"per_gpu_bytes": dict(r.parts), "host_bytes_per_node": r.host, "step_seconds": r.seconds,
            "fits": r.fits, "models": r.models, "usable_bytes": ctx.usable}
