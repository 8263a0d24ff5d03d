"""What every recipe shares: TrainingArguments from plan + recipe, health callbacks, task evaluation, the summary."""
from __future__ import annotations

import dataclasses
import difflib
import math
import random
import re

from launcher.errors import UserError

# Padding share of an unpacked SFT run's micro-batches above which the start lines suggest packing: over this much
# of the compute goes to pad tokens (bench/packing.py: 62 % padding on skewed data, x1.17 real tokens/s packed).
PACKING_ADVICE_SHARE = 0.25


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def training_kwargs(ctx, **method_defaults) -> dict:
    """TrainingArguments values: plan first (batch, precision, ZeRO), then method defaults, then the recipe's own."""
    cfg, plan = ctx.cfg, ctx.plan  # training.* keys the plan owns were refused when the recipe loaded
    from launcher.ds_config import gradient_clipping, training_args_overrides

    kw = dict(
        output_dir=str(ctx.output_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,
        # batch geometry, checkpointing, precision and clipping exactly as in the DeepSpeed JSON of the same plan
        **training_args_overrides(plan, gradient_clipping(cfg)),
        # what trains fits: an eval batch keeps no gradients or activations (8 rows would not, on a 24 GB QLoRA plan)
        per_device_eval_batch_size=plan.micro_batch_size,
        # On CPU, use_cpu=True is what makes accelerate see every DeepSpeed rank (measured: without it each rank
        # silently believes it is alone and trains on its own).
        use_cpu=not has_cuda(),
        deepspeed=ctx.ds_config,
        logging_steps=10,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=100,
        save_total_limit=cfg.safety.keep_checkpoints,
        report_to=["tensorboard"],
        dataloader_num_workers=0,
        # Our ProgressPrinter writes one readable line per log (step, loss, lr, tok/s, ETA) in terminals and
        # Slurm logs alike; tqdm bars garble the latter.
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # a NaN loss must be seen (HealthGuard), not averaged away
        include_num_input_tokens_seen=True,
    )
    if ctx.plan.gradient_checkpointing:
        kw["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    kw.update(method_defaults)
    kw.update(cfg.training)
    return _checkpointing_names(kw)


def _checkpointing_names(kw: dict) -> dict:
    """transformers 5.25 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs); the old names
    still work but warn on every run and go in v6. Pass whichever the installed TrainingArguments reads first (the
    old names then mirror the new, so TRL code reading args.gradient_checkpointing sees the same value)."""
    from transformers import TrainingArguments

    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
            if old in kw:  # a recipe's own activation_checkpointing_kwargs wins over the plan's default
                kw.setdefault("activation" + old[len("gradient"):], kw.pop(old))
    return kw


def load_inputs(ctx, kind: str, path: str, padding_side: str = "right", too_long: str | None = None):
    """What every recipe starts from: the tokenizer and the validated data (its counts go to the run summary).
    Once the rows are counted, the plan is fitted to the longest (ctx.plan may change: read it after this call).
    Returns (tokenizer, bundle, has_eval)."""
    from recipes import builder
    from recipes.data import load_data, padding_share

    tokenizer = builder.load_tokenizer(ctx.cfg, path, padding_side)
    try:
        bundle = load_data(ctx.cfg.data, kind, tokenizer, seed=ctx.cfg.seed, too_long=too_long)
    except ValueError as e:  # chat rows, and a base model's tokenizer (Llama-2-7b-hf, Mistral-7B-v0.1) has no template
        if "chat_template is not set" not in str(e):
            raise
        source = ctx.cfg.model.tokenizer or ctx.cfg.model.name
        raise UserError(f"model.chat_template: the data is chat (lists of role/content messages) and {source}'s "
                        f"tokenizer has no chat template; set model.chat_template to the model's -chat/-Instruct "
                        f"variant (its template is taken) or a .jinja file, or give plain-text data") from None
    ctx.stats.update(bundle.stats)
    cfg = ctx.cfg
    if bundle.stats.get("longest") and not cfg.data.packing:  # packing fills rows up to max_length
        multiple = cfg.training.get("pad_to_multiple_of") or 1
        ctx.fit_plan_to_rows(-(-bundle.stats["longest"] // multiple) * multiple)
    if kind == "sft" and bundle.train_lengths and not cfg.data.packing and not cfg.training.get("group_by_length"):
        # what packing would save, from the counted lengths (print_start advises it when it is large)
        ctx.stats["padding_share"] = round(padding_share(bundle.train_lengths, ctx.plan.micro_batch_size,
                                                         cfg.data.max_length, cfg.seed), 3)
    return tokenizer, bundle, bundle.eval is not None and len(bundle.eval) > 0


# training.* values that parse as their type but make no sense; the HF Trainer accepts them silently or fails
# mid-run. Keys it validates itself are left to it.
TRAINING_RANGES = {"save_steps": (0, False), "logging_steps": (0, False), "eval_steps": (0, False),
                   "num_train_epochs": (0, False), "warmup_steps": (0, True), "weight_decay": (0, True)}


def args_class(name: str):
    """'module:Class' -> the class (a recipe's ARGS_CLASS)."""
    import importlib

    module, _, cls = name.partition(":")
    return getattr(importlib.import_module(module), cls)


def check_training_keys(training: dict, config_cls) -> None:
    """Every `training.*` key names a field of the recipe's TrainingArguments class (did-you-mean otherwise)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in training:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" (did you mean 'training.{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key 'training.{key}' for {config_cls.__name__}{hint}")


def method_module(method: str):
    """recipes.<method>, the one module per method: build(ctx), DATA_KIND, ARGS_CLASS, and RESUMES = False where
    its trainer cannot resume a checkpoint."""
    import importlib

    return importlib.import_module(f"recipes.{method}")


def resumes(method: str) -> bool:
    """Whether `method`'s trainer resumes from a checkpoint (TRL's PPOTrainer does not)."""
    return getattr(method_module(method), "RESUMES", True)


def check_training_section(cfg) -> None:
    """cfg.training's keys against its method's TrainingArguments class (recipes.<method>.ARGS_CLASS; imports TRL)."""
    check_training_keys(cfg.training, args_class(method_module(cfg.method).ARGS_CLASS))


def make_args(config_cls, kwargs: dict):
    """Build a TRL/HF config; unknown or invalid `training.*` keys become one-line errors."""
    check_training_keys(kwargs, config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in kwargs.items():
        kind = fields[key].type  # a class, or a string such as 'float | None'
        _check_training_value(key, value, kind.__name__ if isinstance(kind, type) else str(kind))
    _check_report_to(kwargs.get("report_to"))
    if kwargs.get("use_liger_kernel"):
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:  # the Trainer would fail only after loading the model
            raise UserError("training.use_liger_kernel: liger-kernel is not installed (it needs triton, i.e. a GPU); "
                            "pip install liger-kernel, or remove the key")
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(_training_error(str(e).strip().splitlines()[0], kwargs)) from None


def _training_error(first_line: str, kwargs: dict) -> str:
    """HF's "X is not a valid OptimizerNames, please select one of [40 names]" as one short line naming the key."""
    import difflib

    m = re.match(r"'?(.+?)'? is not a valid (\w+), please select one of \[(.*)\]", first_line)
    keys = [k for k, v in kwargs.items() if m and str(v) == m.group(1)]
    if not keys:
        return f"training: {first_line}"
    valid = [v.strip(" '\"") for v in m.group(3).split(",")]
    close = difflib.get_close_matches(m.group(1), valid, n=1)
    shown = ", ".join(valid[:8]) + (", ..." if len(valid) > 8 else "")
    return (f"training.{keys[0]}: '{m.group(1)}' is not a valid {m.group(2)}"
            f"{f' (did you mean {close[0]}?)' if close else ''}; one of {shown}")


def _check_training_value(key: str, value, type_name: str) -> None:
    """A number where the field is a plain number (a string there fails deep in the optimizer), in its range."""
    plain = re.sub(r"^Optional\[(.*)\]$|^(.*?) \| None$", lambda m: m.group(1) or m.group(2), type_name.strip())
    if value is None or plain not in ("int", "float"):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"training.{key}: expected a number, got {value!r}")
    if key in TRAINING_RANGES:
        low, inclusive = TRAINING_RANGES[key]
        if value < low or (value == low and not inclusive):
            raise UserError(f"training.{key}: must be {'>=' if inclusive else '>'} {low}, got {value!r}")


def _check_report_to(value) -> None:
    """Each logger named in training.report_to is installed (the Trainer otherwise fails after loading the model)."""
    from transformers.integrations import get_available_reporting_integrations

    named = [value] if isinstance(value, str) else list(value or [])
    available = set(get_available_reporting_integrations())
    missing = [n for n in named if n not in available | {"none", "all"}]
    if missing:
        raise UserError(f"training.report_to: {', '.join(missing)} not installed here (available: "
                        f"{', '.join(sorted(available)) or 'none'}); pip install it or choose another")


def default_callbacks(ctx, trainer) -> list:
    from transformers.trainer_callback import PrinterCallback

    from recipes.callbacks import HealthGuard, ProgressPrinter

    trainer.remove_callback(PrinterCallback)  # raw log dicts; ProgressPrinter replaces them

    callbacks = [HealthGuard(ctx.cfg.safety), ProgressPrinter(ctx)]
    try:
        from launcher.preempt import PreemptionCallback
    except ImportError:
        return callbacks
    return callbacks + [PreemptionCallback()]


# ---- task evaluation (rank 0, on a freshly loaded model) ------------------------------------------------------------

def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions for plain-text prompts, tokenised the way TRL tokenises prompt-completion data."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            outputs += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def exact_match_evaluator(ctx, eval_rows: list[dict], model_loader):
    """Evaluator for prompt/completion tasks: exact match of the greedy answer, plus a few sample generations."""
    from recipes.synthetic import exact_match

    cfg = ctx.cfg
    rows = eval_rows[: cfg.eval.num_examples]
    if not rows:
        return None

    def evaluate(when: str) -> dict:
        model, tokenizer = model_loader(when)
        predictions = generate(model, tokenizer, [r["prompt"] for r in rows], cfg.eval.max_new_tokens)
        hits = [exact_match(p, r["completion"]) for p, r in zip(predictions, rows)]
        samples = [{"prompt": r["prompt"], "expected": str(r["completion"]).strip(), "generated": p.strip()}
                   for p, r in zip(predictions[: cfg.eval.samples], rows)]
        del model
        return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}

    return evaluate


# ---- reporting --------------------------------------------------------------------------------------------------------

def print_start(ctx, trainer, resume) -> None:
    plan, args = ctx.plan, trainer.args
    print(f"ftlaunch: recipe {ctx.cfg.name} ({ctx.cfg.method}) -> {ctx.output_dir}")
    print(f"  plan: {plan.device} x{ctx.env.world_size}, ZeRO-{plan.zero_stage if ctx.ds_config else 'off'}, "
          f"micro-batch {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
          f"x {args.world_size} rank(s), precision {plan.precision}, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    for note in ctx.start_notes:
        print(f"  {note}")
    padding = ctx.stats.get("padding_share") or 0.0
    if padding >= PACKING_ADVICE_SHARE:
        print(f"  data: rows differ in length, so ~{padding:.0%} of the token slots in a micro-batch of "
              f"{args.per_device_train_batch_size} are padding; data.packing=true packs rows padding-free instead "
              f"(more rows per step)")
    if resume:
        print(f"  resuming from {resume}")


def collect_metrics(trainer, result, eval_metrics: dict, before, after, wall_s: float) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": result.training_loss if result else None,
        "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "before": before,
        "after": after,
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "wall_seconds": round(wall_s, 1),
        "train_runtime": (result.metrics or {}).get("train_runtime") if result else None,
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def print_summary(ctx, trainer, metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ftlaunch summary: {ctx.cfg.name}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", str(metrics["global_step"]))
    table.add_row("ranks (trainer world size)", str(metrics["world_size"]))
    table.add_row("train loss, first -> last step", f"{_fmt(metrics['train_loss_first'])} -> {_fmt(metrics['train_loss_last'])}")
    for key, value in metrics["eval"].items():
        if key in ("eval_loss", "eval_mean_token_accuracy", "eval_accuracy", "eval_f1_macro",
                   "eval_rewards/accuracies", "eval_rewards/margins"):  # the last two: DPO's own
            table.add_row(key.replace("_", " "), _fmt(value))
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for key in sorted(set(before) | set(after)):
        if key in ("samples", "n", "curve"):
            continue
        if key not in before and before:  # a training-time figure (PPO's first scores, final KL): no "before"
            table.add_row(key.replace("_", " "), _fmt(after.get(key)))
            continue
        table.add_row(f"{key} before -> after", f"{_fmt(before.get(key))} -> {_fmt(after.get(key))}")
    for key, value in (metrics.get("data") or {}).items():
        if isinstance(value, (int, float, str)):
            table.add_row(f"data: {key}", _fmt(value))
        elif key == "dropped" and value:  # rows dropped, by reason
            table.add_row("data: dropped", ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in value.items()))
    table.add_row("wall time (s)", f"{metrics['wall_seconds']:.1f}")
    table.add_row("output", str(ctx.output_dir))
    console = Console()
    console.print(table)
    for when, data in (("before", before), ("after", after)):
        for s in (data or {}).get("samples", []):
            console.print(f"  [{when}] {_shown_prompt(s['prompt'])!r} -> {s['generated']!r} "
                          f"(expected {s['expected']!r})", markup=False, highlight=False)


def _shown_prompt(prompt: str) -> str:
    """The last user turn of a chat-rendered (ChatML) prompt, else the prompt itself: the system text and role
    markers are the same in every sample."""
    turns = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S)
    return turns[-1] if turns else prompt
