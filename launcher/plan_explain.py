"""Words for a plan: why it was chosen, why each alternative was rejected, and what would fit when nothing does.

Pure, like the planner it explains; `suggestions` re-plans nearby requests (lighter method, more GPUs, shorter
sequence) without suggestions of their own.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Optional

from launcher import memory as mem
from launcher.errors import UserError
from launcher.inventory import Inventory, assumed_host_ram
from launcher.plan_types import OFFLOAD_MARGIN
from launcher.shapes import ModelShape

if TYPE_CHECKING:
    from launcher.planner import Plan, PlanRequest, _Context, _Result


def miss_reason(ctx: _Context, result: _Result) -> str:
    parts = []
    if not result.gpu_ok:
        parts.append(f"needs {mem.fmt_bytes(result.parts['total'])} per {unit(ctx)} > usable "
                     f"{mem.fmt_bytes(ctx.usable)} (short by {mem.fmt_bytes(result.parts['total'] - ctx.usable)})")
    if not result.host_ok:
        parts.append(f"needs {mem.fmt_bytes(result.host)} host RAM per node > usable "
                     f"{mem.fmt_bytes(ctx.host_capacity)} (short by {mem.fmt_bytes(result.host - ctx.host_capacity)})")
    return " and ".join(parts)


def unit(ctx: _Context) -> str:
    return "GPU" if ctx.inventory.gpu is not None else "CPU rank"


def describe(result: _Result) -> str:
    return _words(result.stage, result.offload, result.hpz, result.checkpointing, result.micro)


def describe_plan(p: Plan) -> str:
    return _words(p.zero_stage, p.offload, bool(p.zero_hpz_partition_size), p.gradient_checkpointing,
                  p.micro_batch_size)


def _words(stage: int, offload: str, hpz: bool, checkpointing: bool, micro: int) -> str:
    kinds = {"none": "", "optimizer": " + optimizer offload", "all": " + optimizer & parameter offload"}
    return (f"ZeRO-{stage}{kinds[offload]}{' + hpZ' if hpz else ''}, checkpointing {'on' if checkpointing else 'off'}, "
            f"micro-batch {micro}")


def explain(ctx: _Context, best: _Result, per_config) -> list[str]:
    out = [f"chosen {describe(best)}: the fastest plan that fits (predicted {best.seconds:.3g} s/step)"]
    accum = ctx.per_rank_batch // best.micro
    out.append(f"batch: micro-batch {best.micro} x accumulation {accum} x {ctx.dp} rank(s) = global "
               f"{ctx.request.global_batch_size}")
    k = ctx.request.mini_batches
    if k > 1:
        out.append(f"PPO: ppo.num_mini_batches={k}: each rank's rollout batch of {ctx.per_rank_batch} trains as {k} "
                   f"mini-batches of {ctx.per_rank_batch // k} rows, one backward and one optimizer step each (TRL's "
                   f"PPO accumulates only over whole rollout batches, so no accumulation)")
    if best.peak_at != "backward":
        out.append(f"peak memory at the {best.peak_at}, not in backward: the per-{unit(ctx)} breakdown is of that moment"
                   + (" (the optimizer's fp32 gradients and temporaries, made after backward has freed the "
                      "activations)" if best.peak_at == "optimizer step" else ""))
    if best.stage == 3 and ctx.request.method != "full" and ctx.dp > 1:
        out.append("ZeRO-3 partitions the frozen base weights across ranks too")
    if best.hpz:
        out.append(f"ZeRO++ hpZ: a secondary weight copy within each node ({ctx.inventory.ranks_per_node} GPUs) "
                   f"keeps the weight all-gathers off the network")
    if ctx.request.method == "qlora" and best.stage == 3:
        out.append("QLoRA under ZeRO-3: bnb_4bit_quant_storage = the compute dtype so the 4-bit weights shard")
    if best.offload != "none":
        out.append(f"offload: host RAM needed per node {mem.fmt_bytes(best.host)}")
    if ctx.single_process(best.stage, best.offload):
        dtype = mem.load_dtype(ctx.request.weight_dtype, ctx.precision, full_single_process=True)
        if ctx.request.method == "full" and dtype != "float32":
            out.append(f"one process, no DeepSpeed: weights, gradients and optimizer states train in {dtype} (no fp32 "
                       f"master copy); model.dtype=float32 keeps fp32 weights at twice the memory")
        if accum == 1:
            out.append("gradients: what exists at the peak; HF frees them after each step and backward makes them "
                       "as it frees activations (with accumulation they stay whole)")
    return out


def changed_choices(before: Plan, after: Plan) -> str:
    """The choices one plan changed from another, in a start line's words ('' if none did)."""
    def on_off(on: bool) -> str:
        return "on" if on else "off"

    return ", ".join(f"{label} {fmt(getattr(before, key))} -> {fmt(getattr(after, key))}"
                     for key, label, fmt in (("micro_batch_size", "micro-batch", str),
                                             ("gradient_checkpointing", "checkpointing", on_off))
                     if getattr(before, key) != getattr(after, key))


def rejections(ctx: _Context, best: Optional[_Result], per_config) -> list[dict]:
    out = []
    for config_best, first_miss in per_config:
        if config_best is not None and config_best is not best:
            out.append({"plan": config_best.label(), "reason": _slower(config_best, best)})
        if first_miss is not None and (config_best is None or config_best is best):
            out.append({"plan": first_miss.label(), "reason": "does not fit: " + miss_reason(ctx, first_miss)})
    return out


def _slower(other: _Result, best: Optional[_Result]) -> str:
    if best is None:
        return "slower"
    if other.seconds < best.seconds:  # faster, but not by enough to offload
        return (f"predicted {other.seconds:.3g} s/step vs {best.seconds:.3g}: offload is chosen only when predicted "
                f"at least {round(100 * (OFFLOAD_MARGIN - 1))} % faster than the fastest plan without it (host RAM, "
                f"PCIe time)")
    if f"{other.seconds:.3g}" == f"{best.seconds:.3g}":  # the cost model's 1e-6 x stage tie-break decided
        return (f"as fast within the cost model's precision (predicted {other.seconds:.3g} s/step); ties go to the "
                f"lower ZeRO stage")
    return f"slower: predicted {other.seconds:.3g} s/step vs {best.seconds:.3g}"


def suggestions(request: PlanRequest, inventory: Inventory, shape: ModelShape, pins: dict) -> list[str]:
    """Nearby requests that would fit: without pins, a lighter method, more GPUs, a shorter sequence."""
    from launcher.planner import plan

    def fits(req: PlanRequest, inv: Inventory = inventory) -> Optional[Plan]:
        try:
            p = plan(req, inv, shape, suggest=False)
        except UserError:
            return None
        return p if p.fits else None

    ideas = []
    if pins:
        p = fits(unpinned(request))
        if p:
            ideas.append(f"without the pins ({describe_plan(p)})")
    if mem.optimizer_step_temp_bytes(request.optimizer) and fits(replace(request, optimizer="adamw_torch_fused")):
        ideas.append("training.optim=adamw_torch_fused (it makes no temporary in its step)")
    for lighter in {"full": ["lora", "qlora"], "lora": ["qlora"]}.get(request.method, []):
        if shape.arch == "decoder" and fits(replace(request, method=lighter, trainable_params=None)):
            ideas.append(f"{'QLoRA' if lighter == 'qlora' else 'LoRA'} instead of {request.method}")
            break
    if inventory.gpu is not None and (inventory.host_ram_bytes or inventory.host_free_bytes):
        roomy = fits(request, replace(inventory, host_ram_bytes=None, host_free_bytes=None, notes=[]))
        if roomy is not None:  # fits this GPU; only the host RAM (offload, loading) is short
            need = roomy.host_bytes_per_node / request.memory_fraction
            ideas.append(f"{mem.fmt_bytes(need)} of {'free ' if inventory.host_free_bytes else ''}host RAM per node "
                         f"(for the fastest plan that fits this GPU"
                         + ("; --host-ram to plan with what you have)" if inventory.host_ram_assumed else ")"))
    if inventory.gpu is not None:
        for factor in (2, 4, 8, 16, 32, 64):
            inv = scaled(inventory, factor)
            dp = inv.world_size
            batch = -(-request.global_batch_size // dp) * dp
            if fits(replace(request, global_batch_size=batch), inv):
                nodes = f"{inv.nodes}x" if inv.nodes > 1 else ""
                ideas.append(f"{nodes}{inv.ranks_per_node}x{inv.gpu.spec}")
                break
    generated = request.generated_tokens  # PPO/GRPO: shorten the prompt (data.max_length), not the answer
    seq = (request.seq_len - generated) // 2
    while seq >= 64:
        if fits(replace(request, seq_len=seq + generated)):
            ideas.append(f"data.max_length={seq}")  # the recipe key (`ftlaunch plan --model`: --seq-len)
            break
        seq //= 2
    return ideas


def unpinned(request: PlanRequest) -> PlanRequest:
    return replace(request, zero_stage=None, offload=None, micro_batch_size=None, gradient_checkpointing=None,
                   kept=())


def pin_cost(pinned: _Result, free: Plan) -> str:
    """What the pins cost against the plan the planner would choose without them (predicted step time)."""
    if not free.fits or free.predicted_step_seconds is None:
        return "unpinned, nothing else would fit"
    ratio = pinned.seconds / free.predicted_step_seconds
    label = describe_plan(free)
    if ratio <= 1.0001:
        return f"the pins cost nothing: unpinned, the planner would choose {label} too, or one as fast"
    return (f"the pins cost {100 * (ratio - 1):.0f} % per step: unpinned, the planner would choose {label} "
            f"(predicted {free.predicted_step_seconds:.3g} s/step vs {pinned.seconds:.3g})")


def scaled(inventory: Inventory, factor: int) -> Inventory:
    """factor x the GPUs: fill one node up to 8, then add 8-GPU (or same-size) nodes."""
    target = inventory.world_size * factor
    if inventory.nodes == 1 and target <= 8:
        out = replace(inventory, ranks_per_node=target, notes=[])
    else:
        per_node = max(inventory.ranks_per_node, 8)
        out = replace(inventory, nodes=-(-target // per_node), ranks_per_node=per_node, notes=[])  # >= factor x
    if inventory.host_ram_assumed and inventory.gpu is not None:  # as the spec of that size would assume it
        out = replace(out, host_ram_bytes=assumed_host_ram(out.ranks_per_node, inventory.gpu.total_bytes))
    return out
