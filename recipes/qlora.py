"""QLoRA: SFT on a base model loaded in bitsandbytes NF4 with double quantisation, LoRA on all linear layers.

The loading (BitsAndBytesConfig, `prepare_model_for_kbit_training`, quant storage = compute dtype for ZeRO-3) lives
in the shared builder; this module only insists on the combination and reuses the SFT recipe.
"""
from __future__ import annotations

from launcher.errors import UserError
from recipes import sft

DATA_KIND = sft.DATA_KIND


def build(ctx):
    cfg = ctx.cfg
    if not cfg.quant.load_in_4bit:
        raise UserError("quant.load_in_4bit: the qlora method loads the base in 4-bit; set it true or use method sft")
    if cfg.peft.method not in ("lora", "dora"):
        raise UserError(f"peft.method: QLoRA needs lora or dora adapters, got {cfg.peft.method}")
    return sft.build(ctx)
