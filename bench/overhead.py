"""Launcher overhead: wall time of `ftlaunch run` on a tiny recipe vs a plain TRL script doing the same steps.

    .venv/bin/python bench/overhead.py [--steps 30] [--repeats 3]     # goal: median ratio <= 1.10
    .venv/bin/python bench/overhead.py --tiny                         # 5 steps, 1 pair: smoke check
    .venv/bin/python bench/overhead.py --features [--steps 40]        # speed features on/off, loss curves

Both sides run in fresh subprocesses (imports, model load, data, training, save: the whole command), alternating
which goes first, `--repeats` pairs; the figure is the median of the per-pair ratios ftlaunch/plain.
Same model directory (`recipes.builder.tiny_model_dir`, the one lora_tiny loads), same data file (2,700
prompt/completion rows of the recipe's synthetic addition task), same SFTTrainer arguments: the plain script copies
the values ftlaunch's plan and recipe give (micro-batch, accumulation, precision, LR schedule, logging, saving), and
the bench diffs the two runs' training_args.json to prove it. Evaluation is off on both sides
(data.eval_ratio=0, eval.num_examples=0): ftlaunch's before/after exact-match evaluation is extra work, not
overhead.

--features runs `ftlaunch run --recipe lora_tiny` with one speed feature switched at a time (SDPA vs eager
attention; padding-free packing on vs off; `torch.compile` through `training.torch_compile`) and compares wall time,
tokens/s and the loss curves. Compiling costs its first steps, so the table also gives the first step's time and the
steady tokens/s over the second half of the run (from the cumulative `train_runtime` the Trainer logs each step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

GOAL = 1.10
RECIPE = "lora_tiny"
ROWS = 2700  # lora_tiny: 3000 synthetic rows, 10 % held out


def ftlaunch_bin() -> str:
    return str(Path(sys.executable).parent / "ftlaunch")


# ---- the plain TRL script (runs in its own process; imports nothing from ftlaunch) -----------------------------------

def plain_trl(a) -> int:
    """What a user would write by hand for the same run: load, LoRA, SFTTrainer, train, save."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    tokenizer.padding_side = "right"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.precision, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, attn_implementation="sdpa")
    data = load_dataset("json", data_files=a.data, split="train")
    args = SFTConfig(
        output_dir=a.output_dir, seed=42, data_seed=42, max_steps=a.steps, max_length=32, packing=False,
        per_device_train_batch_size=a.micro_batch, per_device_eval_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.accumulation, gradient_checkpointing=a.checkpointing,
        bf16=a.precision == "bf16", fp16=a.precision == "fp16", use_cpu=not torch.cuda.is_available(),
        learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=20, logging_steps=20, logging_first_step=True,
        save_strategy="steps", save_steps=100, save_total_limit=None, report_to=["tensorboard"],
        dataloader_num_workers=0, disable_tqdm=True, logging_nan_inf_filter=False,
        include_num_input_tokens_seen=True, eval_strategy="no", dataset_num_proc=None,
        **({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if a.checkpointing else {}))
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    trainer.save_model(a.output_dir)
    tokenizer.save_pretrained(a.output_dir)
    Path(a.output_dir, "training_args.json").write_text(json.dumps(args.to_dict(), indent=2, default=str))
    return 0


# ---- driver ------------------------------------------------------------------------------------------------------------

def prepare(work: Path):
    """The model dir lora_tiny uses, the data file both sides read, and ftlaunch's plan (for the plain side)."""
    from launcher.config import load_recipe
    from launcher.train import DistEnv, make_plan
    from recipes.builder import tiny_model_dir
    from recipes.synthetic import make_examples, make_view

    cfg = load_recipe(RECIPE, None, [])
    model_dir = tiny_model_dir(cfg.model.tiny, seed=cfg.seed)
    rows = make_view("sft", make_examples("arith", ROWS, seed=cfg.seed), cfg.seed)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                            for r in rows))
    plan = make_plan(load_recipe(RECIPE, None, [f"data.source={data}", "data.eval_ratio=0"]), DistEnv())
    return model_dir, data, plan


def run_timed(argv: list, env: dict) -> tuple[float, int, str, float]:
    """Wall seconds, exit code, output tail, and CPU seconds (user + sys of the process and its children): on a
    shared, loaded machine the CPU time is the steadier of the two."""
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=common.REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, proc.returncode, (proc.stdout + proc.stderr)[-2000:], cpu


def compare_args(a: Path, b: Path) -> list[str]:
    """Differences between the two runs' TrainingArguments (training_args.json: ftlaunch writes it into every run;
    the plain script here writes the same), paths aside."""
    x = json.loads((a / "training_args.json").read_text())
    y = json.loads((b / "training_args.json").read_text())
    skip = {"output_dir", "logging_dir", "run_name", "hub_model_id", "hub_token"}  # hub_token: both redacted
    return [f"{k}: ftlaunch {x.get(k)!r} vs plain {y.get(k)!r}" for k in sorted(set(x) | set(y))
            if k not in skip and x.get(k) != y.get(k)]


def overhead(opts, env: dict) -> int:
    work = Path(common.scratch_dir("bench-overhead-"))
    model_dir, data, plan = prepare(work)
    print(f"   recipe {RECIPE}: model {model_dir}; data {ROWS} rows; plan micro-batch {plan.micro_batch_size} x "
          f"accumulation {plan.gradient_accumulation_steps}, checkpointing {plan.gradient_checkpointing}, "
          f"{plan.precision}; {opts.steps} steps; {opts.repeats} pair(s), order alternating; "
          f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}")
    ftl = [ftlaunch_bin(), "run", "--recipe", RECIPE, f"training.max_steps={opts.steps}", f"data.source={data}",
           "data.eval_ratio=0", "eval.num_examples=0"]
    plain = [sys.executable, str(Path(__file__).resolve()), "--plain", "--model-dir", str(model_dir),
             "--data", str(data), "--steps", str(opts.steps), "--micro-batch", str(plan.micro_batch_size),
             "--accumulation", str(plan.gradient_accumulation_steps), "--precision", plan.precision]
    if plan.gradient_checkpointing:
        plain.append("--checkpointing")
    pairs, failures, checked = [], [], False
    for i in range(opts.repeats):
        times, cpu = {}, {}
        order = ("ftlaunch", "plain") if i % 2 == 0 else ("plain", "ftlaunch")
        for side in order:
            out = work / f"{side}-{i}"
            argv = ftl + [f"output_dir={out}"] if side == "ftlaunch" else plain + ["--output-dir", str(out)]
            wall, rc, tail, cpu[side] = run_timed(argv, env)
            if rc != 0:
                failures.append(f"{side} run {i}: exit {rc}\n{tail}")
            times[side] = wall
        ratio = times["ftlaunch"] / times["plain"]
        cpu_ratio = cpu["ftlaunch"] / cpu["plain"]
        pairs.append((times["ftlaunch"], times["plain"], ratio, cpu["ftlaunch"], cpu["plain"], cpu_ratio))
        print(f"   pair {i + 1} ({order[0]} first): wall ftlaunch {times['ftlaunch']:.1f} s, plain TRL "
              f"{times['plain']:.1f} s, ratio {ratio:.3f} | CPU ftlaunch {cpu['ftlaunch']:.1f} s, plain "
              f"{cpu['plain']:.1f} s, ratio {cpu_ratio:.3f} | load {os.getloadavg()[0]:.1f}", flush=True)
        if not checked and not failures:
            diffs = compare_args(work / f"ftlaunch-{i}", work / f"plain-{i}")
            checked = True
            print("   training_args.json: " + ("identical apart from paths" if not diffs else
                                              "DIFFER: " + "; ".join(diffs)))
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        return 1
    median_ratio = statistics.median(p[2] for p in pairs)
    print(f"\n   FIGURE ftlaunch/plain-TRL wall time, median of {len(pairs)} pair ratio(s): x{median_ratio:.3f} "
          f"(goal <= {GOAL}); medians ftlaunch {statistics.median(p[0] for p in pairs):.1f} s, plain "
          f"{statistics.median(p[1] for p in pairs):.1f} s")
    print(f"   FIGURE ftlaunch/plain-TRL CPU time (user+sys), median of pair ratios: "
          f"x{statistics.median(p[5] for p in pairs):.3f}; medians ftlaunch {statistics.median(p[3] for p in pairs):.1f}"
          f" s, plain {statistics.median(p[4] for p in pairs):.1f} s")
    return 0 if (median_ratio <= GOAL or opts.tiny) else 1


# ---- speed features --------------------------------------------------------------------------------------------------

# The second seed is the noise reference: how far the loss curve moves when only the seed (LoRA init, data order)
# changes. Over a few hundred steps tiny float differences grow into different trajectories, so a feature is judged by
# its 2nd-half mean loss against this spread, not only by the per-step difference.
FEATURES = [("baseline: sdpa, no packing", []),
            ("baseline, another seed (noise reference)", ["seed=43"]),
            ("eager attention", ["model.attn_implementation=eager"]),
            ("packing (bfd, padding-free)", ["data.packing=true"]),
            ("torch.compile (inductor)", ["training.torch_compile=true"])]


def read_run(out: Path) -> dict:
    state = sorted(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    logs = json.loads(state[-1].read_text())["log_history"] if state else []
    steps = [h for h in logs if "loss" in h]
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest.get("metrics") or {}
    tokens = [h.get("num_input_tokens_seen") for h in steps]
    clock = [h.get("train_runtime") for h in steps]  # seconds since train() began, logged at every step
    half = len(steps) // 2
    timed = len(steps) > 3 and all(isinstance(x, (int, float)) for x in tokens + clock)
    return {"loss": [h["loss"] for h in steps], "tokens": tokens, "runtime": metrics.get("train_runtime"),
            "final_tokens": next((t for t in reversed(tokens) if isinstance(t, (int, float))), None),
            "first_step": clock[0] if timed else None,
            "steady_tps": (tokens[-1] - tokens[half]) / (clock[-1] - clock[half]) if timed else None}


def features(opts, env: dict) -> int:
    """Each variant `--repeats` times, order rotating per round; figures are medians, losses from the first round
    (runs are seeded: repeats give the same curve, only the times move)."""
    import numpy as np

    work = Path(common.scratch_dir("bench-features-"))
    runs: dict = {label: [] for label, _ in FEATURES}
    for rnd in range(opts.repeats):
        order = FEATURES[rnd % len(FEATURES):] + FEATURES[:rnd % len(FEATURES)]
        for label, extra in order:
            out = work / f"run-{rnd}-{FEATURES.index((label, extra))}"
            argv = [ftlaunch_bin(), "run", "--recipe", RECIPE, f"training.max_steps={opts.steps}",
                    "training.logging_steps=1", "eval.num_examples=0", "data.eval_ratio=0", f"output_dir={out}",
                    *extra]
            wall, rc, tail, cpu = run_timed(argv, env)
            if rc != 0:
                print(f"   {label}: FAILED exit {rc}\n{tail}")
                return 1
            runs[label].append(dict(read_run(out), wall=wall, cpu=cpu))
            print(f"   round {rnd + 1}: {label}: wall {wall:.1f} s, train {runs[label][-1]['runtime']:.1f} s, "
                  f"CPU {cpu:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    base_label = FEATURES[0][0]
    base = runs[base_label][0]
    base_loss = np.array(base["loss"])
    half = len(base_loss) // 2
    noise = float(np.std(np.diff(base_loss[half:])) / np.sqrt(2)) if len(base_loss) > 4 else float("nan")
    med = lambda label, key: statistics.median(r[key] for r in runs[label])  # noqa: E731
    rows = []
    for label, _ in FEATURES:
        r = runs[label][0]
        loss = np.array(r["loss"])
        tps = statistics.median(x["final_tokens"] / x["runtime"] for x in runs[label]
                                if x["final_tokens"] and x["runtime"])
        steady = [x["steady_tps"] for x in runs[label] if x["steady_tps"]]
        firsts = [x["first_step"] for x in runs[label] if x["first_step"] is not None]
        row = {"feature": label, "train s": med(label, "runtime"), "CPU s": med(label, "cpu"),
               "input tokens": r["final_tokens"], "tokens/s": f"{tps:.0f}",
               "first step s": f"{statistics.median(firsts):.2f}" if firsts else "-",
               "steady tokens/s (2nd half)": f"{statistics.median(steady):.0f}" if steady else "-",
               "loss first": loss[0], "loss 2nd-half mean": float(loss[half:].mean())}
        if label != base_label:
            row["train-time ratio"] = f"{med(label, 'runtime') / med(base_label, 'runtime'):.2f}"
            diff = float(loss[half:].mean() - base_loss[half:].mean())
            if r["final_tokens"] == base["final_tokens"] and len(loss) == len(base_loss):
                row["vs baseline"] = (f"same tokens; max |dloss| per step {np.abs(loss - base_loss).max():.1e}; "
                                      f"2nd-half mean dloss {diff:+.3f}")
            else:
                row["vs baseline"] = (f"{r['final_tokens'] / base['final_tokens']:.2f}x tokens; "
                                      f"2nd-half mean dloss {diff:+.3f}")
        rows.append(row)
    common.print_table(rows, [(k, k) for k in ("feature", "train s", "CPU s", "input tokens", "tokens/s",
                                                "first step s", "steady tokens/s (2nd half)", "loss first",
                                                "loss 2nd-half mean", "train-time ratio", "vs baseline")])
    print(f"   per-step loss noise of the baseline (2nd half, std of step-to-step change / sqrt 2): {noise:.3f}; "
          f"times are medians of {opts.repeats} round(s); input tokens include padding")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke check: 5 steps, one pair")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--features", action="store_true", help="speed features on/off instead of the overhead")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS for both sides ('' = inherit)")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model-dir", "--data", "--output-dir", "--precision"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    common.setup_env()
    if opts.plain:
        return plain_trl(opts)
    opts.steps = opts.steps or (5 if opts.tiny else (40 if opts.features else 30))
    opts.repeats = opts.repeats or (1 if opts.tiny else (2 if opts.features else 3))
    env = {**os.environ, **{k: v for k, v in common.OFFLINE_ENV.items() if v},
           "FTLAUNCH_DS_CONFIG_DIR": common.scratch_dir("bench-ds-")}
    if opts.threads:
        env["OMP_NUM_THREADS"] = opts.threads
    if opts.features:
        common.print_header(f"speed features of `ftlaunch run --recipe {RECIPE}` ({opts.steps} steps each)")
        return features(opts, env)
    common.print_header(f"overhead: ftlaunch run vs plain TRL script ({RECIPE})")
    return overhead(opts, env)


if __name__ == "__main__":
    sys.exit(main())
