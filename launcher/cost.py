"""The planner's cost model: predicted seconds per optimizer step of one candidate plan. Pure; no torch.

It only has to rank candidates on one inventory, not predict wall time: compute at a matmul utilisation that
saturates within a few hundred tokens per micro-batch, a fixed launch cost per layer and pass (what makes small
micro-batches slow on fast GPUs), communication volume per ZeRO stage (half hidden behind compute), and the PCIe and
host optimizer time that offload adds. bench/plan_sweep.py measures how well it ranks (owed on a GPU).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.inventory import CPU_TFLOPS

if TYPE_CHECKING:
    from launcher.planner import _Context

PCIE_BYTES_PER_S = 12e9  # host <-> GPU, effective
CPU_OPTIMIZER_BYTES_PER_S = 5e9  # torch AdamW on host tensors is memory-bound (~20 B touched per param)
CPU_COMM_BYTES_PER_S = 2e9  # gloo between CPU ranks
# A [tokens x hidden] @ [hidden x 4·hidden] matmul of a 1B+ model runs near its peak rate from a few hundred rows;
# the old half-rate point of 1024 tokens overvalued large micro-batches (enough to pick parameter offload over a plain
# plan that fits). What small micro-batches really lose is the per-kernel launch cost, charged per layer and pass.
MATMUL_HALF_RATE_TOKENS = 256
LAYER_PASS_SECONDS = 3e-4  # ~15-30 kernels (norms, rope, LoRA's small matmuls) and framework hooks per layer


def step_seconds(ctx: _Context, stage: int, offload: str, checkpointing: bool, micro: int, hpz: bool) -> float:
    """Predicted seconds per optimizer step. Relative, not absolute: it only has to rank candidates.

    compute: 6 FLOPs/param/token to train, 4 when only activation grads flow (frozen base), 2 for frozen
    models' forward; recompute adds one forward; efficiency grows with tokens per micro-batch (small kernels starve).
    communication: ZeRO-0/1 all-reduce gradients once per step; ZeRO-2 reduce-scatters every micro-step;
    ZeRO-3 also all-gathers weights for forward, backward (and recompute) every micro-step. Half is hidden behind
    compute. Offload adds PCIe traffic and a host optimizer step; parameter offload streams weights every pass.
    """
    req, inv = ctx.request, ctx.inventory
    micro = ctx.train_rows(micro)  # PPO with mini-batches: one backward (and one optimizer step) per mini-batch
    accum = ctx.per_rank_batch // micro
    steps = req.mini_batches  # optimizer steps per planned step: PPO's mini-batches, else 1
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
    efficiency = 0.5 * micro_tokens / (micro_tokens + MATMUL_HALF_RATE_TOKENS)
    passes = 3 if checkpointing else 2  # forward, backward (2x a forward's kernels, charged as one), recompute
    launches = accum * passes * sum(m.shape.layers for m in ctx.models) * LAYER_PASS_SECONDS
    if inv.gpu is not None:
        model = inv.gpu.model
        peak, intra, inter = model.tflops16 * 1e12, model.intra_node_gbps * 1e9, model.inter_node_gbps * 1e9
    else:
        peak, intra, inter = CPU_TFLOPS * 1e12, CPU_COMM_BYTES_PER_S, CPU_COMM_BYTES_PER_S
    compute = flops / (peak * efficiency) * (1.05 if stage == 3 else 1.0) + launches  # ZeRO-3 hooks cost a little
    comm = 0.0
    gathered = sum(m.trainable * 2 + m.frozen_bytes for m in ctx.models)
    grads = sum(m.trainable for m in ctx.models) * 2.0
    if ctx.dp > 1:
        bw = inter if inv.nodes > 1 else intra
        if stage <= 1:
            comm = steps * 2 * grads / bw
        elif stage == 2:
            comm = (accum + steps) * grads / bw
        else:
            gather_bw = intra if hpz else bw
            comm = accum * (passes * gathered / gather_bw + grads / bw)
            if hpz:  # trained weights lose their in-node copy at each step: the first gather after it crosses nodes
                comm += steps * grads / bw
    offload_time = 0.0
    trainable_share = sum(m.trainable for m in ctx.models) / ctx.dp
    if offload != "none" and inv.gpu is not None:
        offload_time += steps * (trainable_share * 20 / CPU_OPTIMIZER_BYTES_PER_S
                                 + trainable_share * 6 / PCIE_BYTES_PER_S)
        if offload == "all":
            offload_time += accum * passes * gathered / ctx.dp / PCIE_BYTES_PER_S
    return compute + 0.5 * comm + offload_time + 1e-6 * stage  # prefer the simpler stage on ties
