"""QLoRA of a Llama-2-7B-shaped model at seq 2048 on one GPU: ftlaunch's plan vs a plain TRL+PEFT script.

    .venv/bin/python bench/qlora_7b.py            # on a GPU (no network: random weights of the card's shape)
    .venv/bin/python bench/qlora_7b.py --tiny     # same code path on CPU, tiny Llama shape, a few steps

Rows (each a fresh process, same GPU, same run):
  * ftlaunch, plan for this GPU   (recipe qlora_7b; micro-batch / checkpointing / optimizer from `plan()`)
  * ftlaunch, plan for 1xRTX3090-24GB, run with the process capped at 24 GiB (set_per_process_memory_fraction)
  * baseline: plain TRL SFTTrainer + PEFT LoraConfig, TRL's defaults (micro-batch 8, gradient checkpointing on,
    adamw_torch_fused), same model dir, data, LoRA settings, seq and global batch
  * liger (only when asked: --only ftlaunch,liger): the first row with `training.use_liger_kernel=true`, same seed
    and data, so its tokens/s and per-step losses compare with the first row's (the planner charges whole logits
    under Liger, so its plan could differ; on an 80 GB card it does not, and the table shows micro-batch and
    checkpointing); skipped where liger-kernel is not installed (it needs triton and a GPU)
Figures: peak torch.cuda.max_memory_allocated / max_memory_reserved over the whole process (goal <= 20 GiB for the
24 GB plan), tokens/s (median optimizer step after warm-up), MFU, and ftlaunch/baseline tokens/s (goal >= 1.5x).

MFU = tokens/s x F / peak, F = 4*N + 12*L*s*d FLOPs per token: N = parameters in matmuls (block linears + lm_head;
the frozen base does forward 2N + input-gradient backward 2N, no weight gradients), 12*L*s*d = attention scores and
values, forward + backward (PaLM's convention, causal mask not discounted). Recomputation (checkpointing) and the
LoRA adapters' own FLOPs are not counted: MFU is useful work. Peak: H100 bf16 dense 989 TFLOP/s (catalogue value of
the detected GPU; CPU: the planner's 0.2 TFLOP/s guess, meaningless, printed for the code path only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

GOAL_PEAK_GIB = 20.0
GOAL_SPEEDUP = 1.5
CARD = "llama-2-7b"
RECIPE = "qlora_7b"


def shape_for(tiny: bool):
    return common.shape_of("tiny-llama" if tiny else CARD)


def flops_per_token(shape, seq: int) -> float:
    n_matmul = shape.layers * shape.linear_params_per_layer + shape.vocab * shape.hidden
    return 4 * n_matmul + 12 * shape.layers * seq * shape.hidden


def peak_flops() -> tuple[float, str]:
    import torch

    from launcher.inventory import CPU_TFLOPS, GPU_CATALOGUE, canonical_gpu_name

    if not torch.cuda.is_available():
        return CPU_TFLOPS * 1e12, f"CPU {CPU_TFLOPS} TFLOP/s (planner guess)"
    name = torch.cuda.get_device_name(0)
    model = GPU_CATALOGUE.get(canonical_gpu_name(name))
    tflops = model.tflops16 if model else 989.0
    return tflops * 1e12, f"{canonical_gpu_name(name)} bf16 dense {tflops:g} TFLOP/s"


# ---- workers (fresh process each) -----------------------------------------------------------------------------------

def worker(opts) -> dict:
    common.setup_env()
    import torch

    common.quiet_libraries()
    common.reset_peak()
    if opts.cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, opts.cap_gib * common.GiB / total))
    out_dir = common.scratch_dir("bench-qlora-")
    result = {"kind": opts.worker, "inventory": opts.inventory}
    with common.metered(result):
        if opts.worker == "ftlaunch":
            trainer, plan = build_ftlaunch(opts, out_dir)
            result.update(plan={"micro_batch_size": plan.micro_batch_size,
                                "gradient_accumulation_steps": plan.gradient_accumulation_steps,
                                "gradient_checkpointing": plan.gradient_checkpointing,
                                "precision": plan.precision, "predicted_bytes": plan.per_gpu_bytes["total"],
                                "inventory": plan.model.get("inventory")})
        else:
            trainer = build_baseline(opts, out_dir)
        args = trainer.args
        result.update(micro_batch=args.per_device_train_batch_size, accumulation=args.gradient_accumulation_steps,
                      checkpointing=bool(args.gradient_checkpointing), optim=getattr(args.optim, "value", str(args.optim)),
                      precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
        if torch.cuda.is_available():
            result["after_load_allocated"] = torch.cuda.memory_allocated()
        tokens = opts.global_batch * opts.seq
        result.update(common.train_timed(trainer, tokens, opts.warmup))
        seen = getattr(trainer.state, "num_input_tokens_seen", 0) or 0
        result.update(tokens_per_step=tokens, tokens_seen=int(seen))
    return result


def build_ftlaunch(opts, out_dir):
    from launcher.inventory import parse_spec

    inventory = common.inventory_here() if opts.inventory == "detect" else parse_spec(opts.inventory)
    overrides = [f"model.name={opts.model_dir}", f"plan.global_batch_size={opts.global_batch}",
                 *common.data_overrides(opts.data, opts.seq, opts.global_batch * opts.steps)]
    training = dict(common.BENCH_TRAINING, max_steps=opts.steps)
    if opts.optim:
        training["optim"] = opts.optim
    if opts.liger:
        training["use_liger_kernel"] = True
    trainer, plan, _, _ = common.ftlaunch_trainer(RECIPE, overrides, inventory, out_dir, training)
    if trainer is None:
        raise RuntimeError(f"plan does not fit: {plan.reason}")
    return trainer, plan


def build_baseline(opts, out_dir):
    """What a user writes from the TRL/PEFT docs: defaults everywhere except the task's own settings (LoRA and
    learning rate as in the recipe)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from launcher.config import load_recipe
    from recipes.builder import peft_config

    recipe = load_recipe(RECIPE, None, [])

    tokenizer = AutoTokenizer.from_pretrained(opts.model_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(opts.model_dir, dtype=torch.bfloat16, quantization_config=quant)
    default_micro = 8  # SFTConfig's per_device_train_batch_size default
    micro = min(default_micro, opts.global_batch)
    args = SFTConfig(output_dir=out_dir, max_length=opts.seq, max_steps=opts.steps,
                     learning_rate=recipe.training["learning_rate"],
                     gradient_accumulation_steps=opts.global_batch // micro, per_device_train_batch_size=micro,
                     logging_steps=1, save_strategy="no", report_to="none", seed=42,
                     use_cpu=not torch.cuda.is_available())
    data = datasets.load_dataset("json", data_files=str(opts.data), split="train")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=peft_config(recipe))


# ---- driver ------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU check: tiny Llama shape, seq 64, 3 steps")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=16, help="recipe qlora_7b's plan.global_batch_size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row (first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--only", default="ftlaunch,rtx3090,baseline", help="rows to run, comma-separated")
    parser.add_argument("--json", help="also write the rows here")
    # worker-only
    parser.add_argument("--worker", choices=["ftlaunch", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--inventory", default="detect", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--optim", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--liger", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.seq = opts.seq or (64 if opts.tiny else 2048)
    opts.steps = opts.steps or (3 if opts.tiny else 6)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.tiny else 2)
    if opts.worker:
        common.emit(worker(opts))
        return 0

    common.setup_env()
    import torch

    common.print_header(f"qlora_7b: ftlaunch plan vs plain TRL+PEFT ({'tiny, CPU code-path check' if opts.tiny else CARD})")
    gpu = torch.cuda.is_available()
    if not gpu and not opts.tiny:
        print("no GPU here: run with --tiny for the CPU code-path check; the real figures need a GPU")
        return 2
    shape = shape_for(opts.tiny)
    model_dir = common.random_model_dir(shape, max_positions=max(4096, opts.seq))
    work = Path(common.scratch_dir("bench-qlora-data-"))
    data = common.digit_text_file(work / "train.jsonl", opts.global_batch * opts.steps, opts.seq)
    print(f"   model: {shape.name} shape, random weights in {model_dir} ({shape.num_params / 1e9:.2f} B params), "
          f"NF4 on load; data: random digits, {opts.seq} tokens per row, global batch {opts.global_batch}, "
          f"{opts.steps} steps ({opts.warmup} warm-up)")
    base = ["bench/qlora_7b.py", "--model-dir", model_dir, "--data", data, "--seq", opts.seq,
            "--global-batch", opts.global_batch, "--steps", opts.steps, "--warmup", opts.warmup]
    # On CPU bitsandbytes' 8-bit optimizers run unpaged, a path no GPU takes: the tiny check times adamw_torch
    # instead and says so.
    optim = ["--optim", "adamw_torch"] if not gpu else []
    rows_spec = {
        "ftlaunch": ("ftlaunch: plan for this device", ["--worker", "ftlaunch", "--inventory", "detect", *optim]),
        "rtx3090": ("ftlaunch: plan for 1xRTX3090-24GB" + (" (capped 24 GiB)" if gpu else ""),
                    ["--worker", "ftlaunch", "--inventory", "1xRTX3090-24GB", *optim,
                     *(["--cap-gib", "24"] if gpu else [])]),
        "baseline": ("baseline: TRL+PEFT defaults", ["--worker", "baseline"]),
        "liger": ("ftlaunch: plan for this device + Liger", ["--worker", "ftlaunch", "--inventory", "detect", "--liger",
                                                             *optim]),
    }
    rows = []
    for key in [k.strip() for k in opts.only.split(",") if k.strip()]:
        label, extra = rows_spec[key]
        print(f"   running {label} ...", flush=True)
        if key == "liger" and importlib.util.find_spec("liger_kernel") is None:
            rows.append({"label": label, "key": key, "skipped": "liger-kernel is not installed (needs triton, a GPU)"})
            print(f"   skipped: {rows[-1]['skipped']}")
            continue
        r = common.run_worker(base + extra, timeout=3000)
        r["label"], r["key"] = label, key
        common.print_row(r)
        rows.append(r)
    peak, peak_label = peak_flops()
    fpt = flops_per_token(shape, opts.seq)
    for r in rows:
        if r.get("tokens_per_s"):
            r["mfu"] = r["tokens_per_s"] * fpt / peak
    mem_key = "max_allocated" if gpu else "max_rss"
    print(f"\n   F = 4*N + 12*L*s*d = {fpt / 1e9:.2f} GFLOP/token; peak {peak_label}; memory column: "
          f"{'torch.cuda.max_memory_allocated (reserved beside it)' if gpu else 'process max RSS (CPU)'}")
    common.print_table(rows, [
        ("row", "label"), ("micro", "micro_batch"), ("accum", "accumulation"),
        ("ckpt", lambda r: None if "checkpointing" not in r else ("on" if r["checkpointing"] else "off")),
        ("optim", "optim"), ("prec", "precision"),
        ("pred GiB", lambda r: common.gib((r.get("plan") or {}).get("predicted_bytes")) if r.get("plan") else None),
        ("peak GiB", lambda r: common.gib(r.get(mem_key))),
        ("reserved GiB", lambda r: common.gib(r.get("max_reserved")) if gpu else None),
        ("s/step", "seconds_per_step"), ("tokens/s", lambda r: None if not r.get("tokens_per_s") else
                                         f"{r['tokens_per_s']:.0f}"),
        ("MFU", lambda r: None if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"),
        ("error / skipped", lambda r: (r.get("error") or r.get("skipped") or "")[:120] or None)])
    by = {r["key"]: r for r in rows}
    ok = True
    if by.get("ftlaunch", {}).get("tokens_per_s") and by.get("baseline", {}).get("tokens_per_s"):
        speedup = by["ftlaunch"]["tokens_per_s"] / by["baseline"]["tokens_per_s"]
        print(f"\n   FIGURE speedup ftlaunch/baseline tokens/s: x{speedup:.2f} (goal >= {GOAL_SPEEDUP})"
              + ("" if gpu else "  [CPU tiny: code path only, not the goal]"))
        if gpu:
            ok &= speedup >= GOAL_SPEEDUP
    liger, plain = by.get("liger", {}), by.get("ftlaunch", {})
    if liger.get("tokens_per_s") and plain.get("tokens_per_s"):
        steps = list(zip(plain.get("losses") or [], liger.get("losses") or []))
        worst = max((abs(a - b) for a, b in steps), default=float("nan"))
        print(f"   FIGURE Liger/plain tokens/s: x{liger['tokens_per_s'] / plain['tokens_per_s']:.2f}; "
              f"max per-step |loss difference| {worst:.2e} over {len(steps)} steps (same seed and data)")
    small = by.get("rtx3090", {})
    if small.get(mem_key):
        print(f"   FIGURE peak of the 24 GB plan: {small[mem_key] / common.GiB:.2f} GiB "
              f"{'max allocated' if gpu else 'max RSS'} "
              f"(goal <= {GOAL_PEAK_GIB} GiB)" + ("" if gpu else "  [CPU RSS, not the goal]"))
        if gpu:
            ok &= small[mem_key] <= GOAL_PEAK_GIB * common.GiB
    errors = [r for r in rows if r.get("error")]
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2, default=str))
    return 1 if errors else (0 if ok else common.GOAL_MISSED)


if __name__ == "__main__":
    sys.exit(main())
