"""The finished run's README.md: what was trained from what, on what data and hardware, how it scored, and how to
load it. TRL writes a generic card on every save ("fine-tuned version of [None]" for any local base model, a
quick-start naming model="None"); the last save is followed by this one, from what the run knows."""
from __future__ import annotations

from pathlib import Path

from launcher.manifest import redact

LOADERS = {"rm": "AutoModelForSequenceClassification", "classify": "AutoModelForSequenceClassification"}


def write_model_card(out: Path, cfg, plan, metrics: dict, num_labels: int | None = None) -> Path:
    """`num_labels`: a sequence-classification model's head size, which loading an adapter must be told."""
    out = Path(out)
    adapter = (out / "adapter_config.json").is_file()
    loader = LOADERS.get(cfg.method, "AutoModelForCausalLM")
    if adapter:
        peft_loader = "AutoPeftModelForSequenceClassification" if loader != "AutoModelForCausalLM" else \
            "AutoPeftModelForCausalLM"
        labels = f", num_labels={num_labels}" if num_labels and loader != "AutoModelForCausalLM" else ""
        load = f"from peft import {peft_loader}\n\nmodel = {peft_loader}.from_pretrained(\"{out}\"{labels})"
        if cfg.quant.load_in_4bit or cfg.method == "qlora":
            load = _four_bit_load(cfg, plan, out, peft_loader, labels)
        kind = "QLoRA" if cfg.method == "qlora" else {"lora": "LoRA", "dora": "DoRA"}.get(cfg.peft.method,
                                                                                         cfg.peft.method)
        what = f"A {kind} adapter (r {cfg.peft.r}) on `{cfg.model.name}`"
    else:
        load = f"from transformers import {loader}\n\nmodel = {loader}.from_pretrained(\"{out}\")"
        what = f"A full fine-tune of `{cfg.model.name}`"
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    scores = [f"- {k}: {_fmt(before.get(k))} -> {_fmt(after.get(k))}" for k in sorted(set(before) | set(after))
              if k != "n" and isinstance(after.get(k), (int, float))]
    if scores and after.get("n"):
        scores.append(f"- on {after['n']} held-out rows")
    plan_words = (f"ZeRO-{plan.zero_stage}, micro-batch {plan.micro_batch_size} x accumulation "
                  f"{plan.gradient_accumulation_steps} x {plan.world_size} rank(s), {plan.precision}, gradient "
                  f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}")
    lines = [
        "---",
        f"library_name: {'peft' if adapter else 'transformers'}",
        f"tags: [ftlaunch, {cfg.method}]",
        "---",
        "",
        f"# {cfg.name}",
        "",
        f"{what}, trained with the ftlaunch recipe `{cfg.name}` (method `{cfg.method}`) for "
        f"{metrics.get('global_step')} steps on `{redact(str(cfg.data.source))}`.",
        "",
        f"Plan: {plan_words} on {plan.model.get('inventory')}.",
        "",
        "## Held-out scores, before -> after training",
        "",
        *(scores or ["(no held-out evaluation: eval.num_examples is 0 or there was no held-out data)"]),
        "",
        "## Load",
        "",
        "```python",
        load,
        "```",
        "",
        "`recipe.yaml` holds the resolved recipe and `manifest.json` the versions, command, plan and metrics.",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _four_bit_load(cfg, plan, out: Path, peft_loader: str, labels: str) -> str:
    """The adapter was trained (and scored) on the 4-bit base: load that base again, not the original weights (the
    adapter on those computes something else, by the quantisation error)."""
    from launcher.memory import PRECISION_DTYPES

    return "\n".join([
        "import torch",
        f"from peft import {peft_loader}",
        "from transformers import BitsAndBytesConfig",
        "",
        "# the 4-bit base it was trained on; `ftlaunch export RUN_DIR --merge` folds the adapter into that base,",
        "# dequantised, for a plain full-precision model",
        f"quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{cfg.quant.quant_type}\", "
        f"bnb_4bit_use_double_quant={cfg.quant.double_quant}, "
        f"bnb_4bit_compute_dtype=torch.{PRECISION_DTYPES[plan.precision]})",
        f"model = {peft_loader}.from_pretrained(\"{out}\"{labels}, quantization_config=quant)"])


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
