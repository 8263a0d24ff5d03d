"""Is the plan ftlaunch picks fast? Tokens/s of the chosen plan vs the best of an exhaustive sweep over micro-batch x
gradient checkpointing on the same GPU (goal >= 95 %), and no OOM among the sweep points predicted to fit.

    .venv/bin/python bench/plan_sweep.py                                  # GPU: qwen2.5-1.5b LoRA, seq 2048
    .venv/bin/python bench/plan_sweep.py --card llama-2-7b --method qlora # the QLoRA flagship (slower: ~10 runs)
    .venv/bin/python bench/plan_sweep.py --tiny                           # CPU: tiny shape, CPU inventory

Every sweep point is a fresh process through ftlaunch's own path with the plan pinned (ZeRO-0, micro-batch,
checkpointing; global batch fixed, so accumulation = global / micro), including the points the planner predicts
not to fit (they may run anyway: then the planner was conservative; an OOM there is expected). ZeRO stage is not
swept on one GPU: the planner skips ZeRO-1/2/3 without offload there (nothing to partition), and offload only
trades speed for memory. The chosen plan is `plan()` for this device with nothing pinned.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import RECIPES  # noqa: E402

GOAL = 0.95


def chosen_plan(opts, model_dir, data):
    """plan() for this device, nothing pinned: what `ftlaunch run` would pick (with the sweep's CPU fallbacks)."""
    overrides = [f"model.name={model_dir}", f"plan.global_batch_size={opts.global_batch}",
                 *common.data_overrides(data, opts.seq, opts.global_batch)]
    inventory = common.inventory_here()
    p, _, _ = common.ftlaunch_plan(RECIPES[opts.method], overrides, inventory, cpu_fallbacks=True)
    return p, inventory


def micro_batches(n: int) -> list[int]:
    out, m = [], 1
    while m <= n:
        if n % m == 0:
            out.append(m)
        m *= 2
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny shape, CPU inventory, short runs")
    parser.add_argument("--card", default="qwen2.5-1.5b", help="model card (launcher/shapes.py)")
    parser.add_argument("--method", default="lora", choices=sorted(RECIPES))
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=None, help="16 (tiny: 8)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro", default=None, help="comma-separated micro-batches (default: every power of two "
                                                      "dividing the global batch)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.seq = opts.seq or (128 if opts.tiny else 2048)
    opts.steps = opts.steps or (3 if opts.tiny else 4)
    opts.global_batch = opts.global_batch or (8 if opts.tiny else 16)
    if opts.tiny and not opts.micro:
        opts.micro = "2,8"  # + the chosen point: keeps the CPU check to ~5 short runs
    if opts.worker:
        common.setup_env()
        common.quiet_libraries()
        micro, ckpt = json.loads(opts.worker)
        r = common.pinned_run(RECIPES[opts.method], opts.model_dir, opts.data, seq=opts.seq, micro=micro,
                              global_batch=opts.global_batch, checkpointing=ckpt, steps=opts.steps,
                              warmup=opts.warmup)
        common.emit(dict(r, micro=micro, ckpt=ckpt))
        return 0

    common.setup_env()
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not opts.tiny:
        print("no GPU here: run with --tiny for the CPU code-path check; the real figures need a GPU")
        return 2
    shape = common.shape_of("tiny-256" if opts.tiny else opts.card)
    common.print_header(f"plan sweep: chosen plan vs exhaustive micro-batch x checkpointing "
                        f"({shape.name} {opts.method}, seq {opts.seq}, global batch {opts.global_batch})"
                        + ("" if gpu else " [CPU tiny: code path, not the goal]"))
    model_dir = common.random_model_dir(shape, max_positions=max(4096, opts.seq))
    data = common.digit_text_file(Path(common.scratch_dir("bench-sweep-")) / "train.jsonl",
                                  opts.global_batch * opts.steps, opts.seq)
    p, inventory = chosen_plan(opts, model_dir, data)
    print(f"   inventory: {inventory.describe()}; chosen: micro-batch {p.micro_batch_size}, checkpointing "
          f"{'on' if p.gradient_checkpointing else 'off'}, ZeRO-{p.zero_stage} {p.offload} (fits {p.fits}, "
          f"predicted {common.gib(p.per_gpu_bytes.get('total'))} GiB)")
    micros = [int(m) for m in opts.micro.split(",")] if opts.micro else micro_batches(opts.global_batch)
    points = [(m, c) for m in micros for c in (False, True)]
    if (p.micro_batch_size, p.gradient_checkpointing) not in points:
        points.append((p.micro_batch_size, p.gradient_checkpointing))
    rows = []
    for micro, ckpt in points:
        print(f"   micro {micro} ckpt {'on' if ckpt else 'off'} ...", flush=True)
        r = common.run_worker(["bench/plan_sweep.py", "--worker", json.dumps([micro, ckpt]), "--model-dir",
                               model_dir, "--data", data, "--seq", opts.seq, "--global-batch", opts.global_batch,
                               "--steps", opts.steps, "--warmup", opts.warmup, "--method", opts.method,
                               *(["--tiny"] if opts.tiny else [])], timeout=1800)
        r.setdefault("micro", micro)
        r.setdefault("ckpt", ckpt)
        r["chosen"] = (micro, ckpt) == (p.micro_batch_size, p.gradient_checkpointing)
        common.print_row(r)
        rows.append(r)
    mem_key = "max_allocated" if gpu else "max_rss"
    print()
    common.print_table(rows, [
        ("micro", "micro"), ("ckpt", lambda r: "on" if r["ckpt"] else "off"),
        ("chosen", lambda r: "<==" if r["chosen"] else ""),
        ("pred fits", lambda r: r.get("predicted_fits")),
        ("pred GiB", lambda r: common.gib((r.get("predicted") or {}).get("total"))),
        ("peak GiB", lambda r: common.gib(r.get(mem_key))),
        ("pred s/step", lambda r: None if r.get("predicted_step_seconds") is None else
         f"{r['predicted_step_seconds']:.3g}"),
        ("s/step", "seconds_per_step"),
        ("tokens/s", lambda r: None if not r.get("tokens_per_s") else f"{r['tokens_per_s']:.0f}"),
        ("error", lambda r: (r.get("error") or "")[:90] or None)])
    ran = [r for r in rows if r.get("tokens_per_s")]
    best = max(ran, key=lambda r: r["tokens_per_s"], default=None)
    chosen = next((r for r in rows if r["chosen"]), None)
    bad_oom = [r for r in rows if r.get("predicted_fits") and "OOM" in (r.get("error") or "")]
    ok = True
    if best and chosen and chosen.get("tokens_per_s"):
        share = chosen["tokens_per_s"] / best["tokens_per_s"]
        print(f"\n   FIGURE chosen plan at {share:.1%} of the sweep's best tokens/s (best: micro {best['micro']}, "
              f"ckpt {'on' if best['ckpt'] else 'off'}); goal >= {GOAL:.0%}"
              + ("" if gpu else "  [CPU tiny, not the goal]"))
        ok &= share >= GOAL or not gpu
    else:
        print("\n   FIGURE missing: the chosen plan did not run" + (f" ({chosen.get('error')})" if chosen else ""))
        return 1
    print(f"   OOM among points predicted to fit: {len(bad_oom)}"
          + ("" if not bad_oom else " -> " + ", ".join(f"micro {r['micro']} ckpt {r['ckpt']}" for r in bad_oom)))
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0 if ok and not bad_oom else common.GOAL_MISSED


if __name__ == "__main__":
    sys.exit(main())
