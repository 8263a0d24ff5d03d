"""The planner's predicted peak per GPU (`launcher.planner.estimate`) vs the measured peak, configuration by
configuration (method x seq len x micro-batch x checkpointing, shapes 0.5B-7B). Goal: within +-10 % each.
The GPU list is SFT (full, LoRA, QLoRA); the CPU list adds DPO, reward modelling, GRPO, PPO and classification.

    .venv/bin/python bench/memory_accuracy.py                  # on a GPU: 15 configurations, ~1 min each
    .venv/bin/python bench/memory_accuracy.py --only 0,1,2     # a subset (indices as printed by --list)
    .venv/bin/python bench/memory_accuracy.py --cpu            # CPU: 30 configurations, 135M-0.5B, live tensors
    .venv/bin/python bench/memory_accuracy.py --tiny           # CPU: tiny shapes (the tests' quick check)

Every configuration runs in a fresh process through ftlaunch's own path (recipe sft_7b / lora_7b / qlora_7b with the
model swapped for random weights of the card's shape, plan pinned to ZeRO-0, the given micro-batch and
checkpointing, global batch = micro-batch) for a few optimizer steps on random-digit rows that are exactly `seq`
tokens long. Measured: torch.cuda.max_memory_allocated over the whole process (load + steps); reserved beside it.
The goal's figure is the prediction less its "other" part (the 1 GiB CUDA-runtime constant, which the allocator does
not see, and the fragmentation margin, which allocated excludes) against allocated, as on a CPU below; beside it the
whole prediction against reserved + that constant, what the process really holds.

On a CPU (--cpu, --tiny) each configuration executes the plan for an H100 (bf16 weights and autocast, the same
TRL/PEFT/bitsandbytes code) and the meter is the peak of live tensor bytes (bench/tensor_meter.py), compared with
the prediction less its "other" part (CUDA runtime and allocator margin, which a CPU does not have). It checks the
tensor-level memory model (weights, grads, optimizer states, activations, logits) before any GPU is lent; it is not
the GPU goal. One difference is removed on purpose: LoRA dropout is off (CPU dropout keeps a 4-byte float noise
tensor per element where CUDA keeps a 1-byte mask; the planner models both, see launcher/memory.py). QLoRA runs the
recipe's paged_adamw_8bit: bitsandbytes >= 0.49 runs its 8-bit optimizers on a CPU (paging falls back to ordinary
tensors there, with a warning); the rows say which optimizer ran. On a GPU paged states live in CUDA managed memory,
outside what `max_memory_allocated` counts, so there the prediction (which counts them) errs on the safe side.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import RECIPES, shape_of  # noqa: E402

GOAL = 0.10

# (card, method, seq, micro-batch, checkpointing): 0.5B-7B, every method, both checkpointing settings.
GPU_CONFIGS = [
    ("qwen2.5-0.5b", "full", 512, 4, False),
    ("qwen2.5-0.5b", "full", 2048, 1, False),
    ("qwen2.5-0.5b", "full", 2048, 4, True),
    ("qwen2.5-0.5b", "lora", 2048, 2, False),
    ("qwen2.5-0.5b", "lora", 1024, 8, True),
    ("qwen2.5-0.5b", "qlora", 2048, 2, False),
    ("qwen2.5-1.5b", "full", 1024, 1, True),
    ("qwen2.5-1.5b", "lora", 2048, 2, True),
    ("llama-2-7b", "lora", 512, 2, False),
    ("llama-2-7b", "lora", 2048, 1, False),
    ("llama-2-7b", "lora", 2048, 4, True),
    ("llama-2-7b", "qlora", 2048, 1, False),
    ("llama-2-7b", "qlora", 2048, 4, True),
    ("llama-2-7b", "qlora", 4096, 1, True),
    ("llama-2-7b", "qlora", 512, 8, False),
]
# CPU tensor check: real small cards (qwen2.5-0.5b's 152k vocabulary makes the lm_head/loss term large).
CPU_CONFIGS = [
    ("qwen2.5-0.5b", "lora", 512, 2, False), ("qwen2.5-0.5b", "lora", 512, 2, True),
    ("qwen2.5-0.5b", "lora", 1024, 1, False), ("qwen2.5-0.5b", "qlora", 512, 2, False),
    ("qwen2.5-0.5b", "qlora", 256, 4, True), ("qwen2.5-0.5b", "full", 256, 2, False),
    ("qwen2.5-0.5b", "full", 256, 1, True), ("smollm2-135m", "full", 512, 2, False),
    ("smollm2-135m", "full", 512, 4, True), ("smollm2-135m", "lora", 512, 4, False),
    ("smollm2-135m", "lora", 256, 8, True), ("smollm2-135m", "qlora", 1024, 2, False),
]
# Methods beyond SFT (CPU check only): method -> (recipe, data kind, overrides). dpo_7b as shipped (LoRA; the
# reference is the adapter-disabled policy) and with full fine-tuning (TRL then holds a frozen reference copy), rm_7b,
# GRPO (grpo_tiny's settings, full or LoRA), PPO (ppo_tiny's: LoRA policy, its adapter-disabled reference, reward
# and value models from one random reward model of the policy's shape; one PPO epoch per update) and a sequence
# classifier. Rows are random digits: `seq` tokens each side of a pair; for GRPO and PPO `seq` is the prompt, and
# every completion is GRPO_COMPLETION tokens (min_new_tokens forces it) or PPO_RESPONSE (PPO's tensors are that
# long whatever it samples).
GRPO_COMPLETION, PPO_RESPONSE = 128, 64
_GRPO = ["data.format=prompts", f"grpo.max_completion_length={GRPO_COMPLETION}", "grpo.num_generations=2",
         "grpo.reward=digits"]
METHODS = {"dpo": ("dpo_7b", "pairs", ["data.format=preference"]),
           "dpo-full": ("dpo_7b", "pairs", ["data.format=preference", "peft.method=none"]),
           "rm": ("rm_7b", "rm-pairs", ["data.format=preference"]),
           "grpo": ("grpo_tiny", "prompts", _GRPO), "grpo-lora": ("grpo_tiny", "prompts", [*_GRPO, "peft.method=lora"]),
           "ppo": ("ppo_tiny", "prompts", ["data.format=prompts", f"ppo.response_length={PPO_RESPONSE}",
                                           "ppo.num_ppo_epochs=1"]),
           "ppo-long": ("ppo_tiny", "prompts", ["data.format=prompts", f"ppo.response_length={4 * PPO_RESPONSE}",
                                                "ppo.num_ppo_epochs=1"]),
           "cls": ("cls_tiny", "labels", ["data.format=classification", "classify.class_weights=none"]),
           "full-8bit": ("sft_7b", "text", ["training.optim=adamw_8bit"]),  # bitsandbytes' 8-bit AdamW states
           "lora-eager": ("lora_7b", "text", ["model.attn_implementation=eager"])}  # the s² attention matrices
CPU_CONFIGS += [("qwen2.5-0.5b", "dpo", 256, 2, False), ("qwen2.5-0.5b", "dpo", 256, 2, True),
                ("smollm2-135m", "dpo", 512, 2, False), ("smollm2-135m", "dpo-full", 256, 2, False),
                ("qwen2.5-0.5b", "rm", 512, 2, False), ("qwen2.5-0.5b", "rm", 512, 4, True),
                ("qwen2.5-0.5b", "grpo", 128, 4, False), ("qwen2.5-0.5b", "grpo", 128, 4, True),
                ("qwen2.5-0.5b", "grpo-lora", 128, 4, False), ("smollm2-135m", "grpo", 256, 8, False),
                ("qwen2.5-0.5b", "cls", 512, 4, False), ("smollm2-135m", "cls", 512, 8, True),
                ("smollm2-135m", "ppo", 64, 4, False), ("qwen2.5-0.5b", "ppo", 128, 2, True),
                ("smollm2-135m", "ppo-long", 64, 1, False, 16),  # 16 micro-batches per update: the rollout peaks
                ("qwen2.5-0.5b", "full-8bit", 256, 2, False), ("smollm2-135m", "full-8bit", 512, 4, True),
                ("smollm2-135m", "lora-eager", 512, 2, False)]
CPU_PLAN = "1xH100-80GB"  # the plan a CPU check executes
# Tiny shapes for the CPU code-path check (names: common.TINY_SHAPES).
TINY_CONFIGS = [
    ("tiny-256", "full", 128, 2, False), ("tiny-256", "full", 256, 8, False), ("tiny-256", "full", 256, 8, True),
    ("tiny-256", "lora", 256, 8, False), ("tiny-256", "lora", 256, 8, True), ("tiny-256", "qlora", 256, 8, False),
    ("tiny-512", "full", 256, 4, False), ("tiny-512", "full", 256, 4, True), ("tiny-512", "lora", 128, 8, False),
    ("tiny-512", "lora", 256, 8, True), ("tiny-512", "qlora", 256, 4, False), ("tiny-512", "qlora", 256, 8, True),
]


def digit_pairs_file(path: Path, rows: int, tokens: int, seed: int = 0, extra: int = 8) -> Path:
    """Preference rows whose prompt + answer are `tokens + extra` digits (one token each): DPO truncates them at
    max_length to exactly `tokens`; TRL's reward trainer drops over-long pairs instead, so its rows use extra=-2
    (room for the special tokens)."""
    import random

    rng = random.Random(seed)
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    with Path(path).open("w") as f:
        for _ in range(rows):
            half = tokens // 2
            f.write(json.dumps({"prompt": digits(half), "chosen": digits(tokens - half + extra),
                                "rejected": digits(tokens - half + extra)}) + "\n")
    return Path(path)


def data_file(kind: str, path: Path, tokens: int) -> Path:
    """64 rows of `kind` (text, pairs, rm-pairs, prompts, labels) that tokenise to exactly `tokens` each (one token
    per digit with the bench tokenizer, which adds a BOS: prompts are tokens - 1 digits, the rest is truncated)."""
    if kind == "text":
        return common.digit_text_file(path, 64, tokens)
    if kind in ("pairs", "rm-pairs"):
        return digit_pairs_file(path, 64, tokens, extra=-2 if kind == "rm-pairs" else 8)
    import random

    rng = random.Random(0)
    with path.open("w") as f:
        for n in range(64):
            digits = "".join(rng.choice("0123456789") for _ in range(tokens - 1 if kind == "prompts" else tokens + 8))
            f.write(json.dumps({"prompt": digits} if kind == "prompts" else {"text": digits, "label": n % 2}) + "\n")
    return path


def worker(opts) -> dict:
    common.setup_env()
    common.quiet_libraries()
    card, method, seq, micro, ckpt, *accumulation = opts.config
    result = {"card": card, "method": method, "seq": seq, "micro": micro, "ckpt": ckpt}
    import torch

    kwargs = {}
    if not torch.cuda.is_available():
        from launcher.inventory import detect_inventory

        kwargs = dict(inventory=detect_inventory(CPU_PLAN), live_tensors=True,
                      overrides=["peft.dropout=0"] if method != "full" else [])
        if method in METHODS:
            kwargs["overrides"] += METHODS[method][2]
        if method.startswith("grpo"):
            kwargs["training"] = {"generation_kwargs": {"min_new_tokens": GRPO_COMPLETION}}
        if method.startswith("ppo"):
            kwargs["overrides"].append(f"ppo.reward_model={opts.scorer_dir}")
    recipe = METHODS[method][0] if method in METHODS else RECIPES[method]
    result.update(common.pinned_run(recipe, opts.model_dir, opts.data, seq=seq, micro=micro,
                                    global_batch=micro * (accumulation or [1])[0], checkpointing=ckpt,
                                    steps=opts.steps, **kwargs))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU: 135M-0.5B shapes, live tensor bytes")
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny shapes, live tensor bytes")
    parser.add_argument("--only", default=None, help="comma-separated indices into the configuration list")
    parser.add_argument("--limit", type=int, default=None, help="first N configurations")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--scorer-dir", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        opts.config = json.loads(opts.worker)
        common.emit(worker(opts))
        return 0
    configs = TINY_CONFIGS if opts.tiny else CPU_CONFIGS if opts.cpu else GPU_CONFIGS
    chosen = list(range(len(configs)))
    if opts.only:
        chosen = [int(i) for i in opts.only.split(",") if i.strip()]
    if opts.limit:
        chosen = chosen[:opts.limit]
    if opts.list:
        for i, c in enumerate(configs):
            print(i, *c)
        return 0

    common.setup_env()
    import torch

    gpu = torch.cuda.is_available()
    common.print_header("memory accuracy: planner estimate() vs measured peak"
                        + ("" if gpu else f" (CPU: live tensors of the {CPU_PLAN} plan; not the GPU goal)"))
    if not gpu and not (opts.tiny or opts.cpu):
        print("no GPU here: --cpu (or --tiny) checks the tensor-level model on this CPU; the goal needs a GPU")
        return 2
    work = Path(common.scratch_dir("bench-mem-data-"))
    rows, data_files = [], {}
    for i in chosen:
        card, method, seq, micro, ckpt, *accumulation = configs[i]
        shape = shape_of(card)
        model_dir = common.random_model_dir(shape, max_positions=max(4096, seq))
        kind = METHODS[method][1] if method in METHODS else "text"
        if (kind, seq) not in data_files:  # the same 64 rows for every configuration of this length
            data_files[kind, seq] = data_file(kind, work / f"{kind}{seq}.jsonl", seq)
        data = data_files[kind, seq]
        print(f"   [{i}] {card} {method} seq {seq} micro {micro} ckpt {'on' if ckpt else 'off'} ...", flush=True)
        scorer = ["--scorer-dir", common.random_model_dir(shape, max(4096, seq), scorer=True)] \
            if method.startswith("ppo") else []
        r = common.run_worker(["bench/memory_accuracy.py", "--worker", json.dumps(configs[i]), "--model-dir",
                               model_dir, "--data", data, *scorer], timeout=1800)
        r.update(index=i, card=card, method=method, seq=seq, micro=micro, ckpt=ckpt,
                 accumulation=(accumulation or [1])[0])
        pred = (r.get("predicted") or {}).get("total")
        measured = r.get("max_allocated" if gpu else "live_peak")
        if pred and measured:
            # tensors (the prediction less "other": runtime + fragmentation margin) vs what the allocator handed out
            # (GPU) or the live tensors (CPU); on a GPU also the whole prediction vs what the process holds
            # (reserved + the CUDA context), the figure `fits` uses
            r["pred_tensors"] = pred - r["predicted"]["other"]
            r["err"] = r["pred_tensors"] / measured - 1
            if gpu:
                from launcher.memory import CUDA_RUNTIME_BYTES

                r["err_total"] = pred / (r["max_reserved"] + CUDA_RUNTIME_BYTES) - 1
        common.print_row(r)
        rows.append(r)
    pct = lambda k: (lambda r: None if r.get(k) is None else f"{100 * r[k]:+.1f}%")  # noqa: E731
    cols = [("#", "index"), ("model", "card"), ("method", "method"), ("seq", "seq"), ("micro", "micro"),
            ("accum", "accumulation"),
            ("ckpt", lambda r: "on" if r["ckpt"] else "off"),
            ("pred GiB", lambda r: common.gib((r.get("predicted") or {}).get("total")))]
    if gpu:
        cols += [("pred tensors GiB", lambda r: common.gib(r.get("pred_tensors"))),
                 ("alloc GiB", lambda r: common.gib(r.get("max_allocated"))), ("err vs alloc", pct("err")),
                 ("reserved GiB", lambda r: common.gib(r.get("max_reserved"))),
                 ("total vs reserved+1GiB", pct("err_total"))]
    else:
        cols += [("optim", "optim"), ("pred tensors GiB", lambda r: common.gib(r.get("pred_tensors"))),
                 ("live peak GiB", lambda r: common.gib(r.get("live_peak"))), ("err", pct("err"))]
    cols.append(("error", lambda r: (r.get("error") or "")[:100] or None))
    print()
    common.print_table(rows, cols)
    measured = [r for r in rows if r.get("err") is not None]
    within = [r for r in measured if abs(r["err"]) <= GOAL]
    oom = [r for r in rows if "OOM" in (r.get("error") or "")]
    print(f"\n   FIGURE {len(within)}/{len(rows)} configurations within +-{GOAL:.0%} "
          f"(tensor-level prediction vs {'max_memory_allocated' if gpu else 'CPU live tensors'}); "
          f"worst {max((abs(r['err']) for r in measured), default=float('nan')):.1%}; "
          f"OOM {len(oom)}; failed {len([r for r in rows if r.get('error')])}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2, default=str))
    if any(r.get("error") for r in rows):
        return 1
    return common.GOAL_MISSED if gpu and len(within) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
