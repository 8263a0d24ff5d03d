"""QLoRA: SFT on a base model loaded in bitsandbytes NF4 with double quantisation, LoRA on all linear layers.

The loading (BitsAndBytesConfig, `prepare_model_for_kbit_training`, quant storage = compute dtype for ZeRO-3) lives
in the shared builder, and the config loader already insists on the combination (method qlora sets
quant.load_in_4bit; 4-bit needs peft.method lora or dora), so this recipe is the SFT recipe.
"""
from __future__ import annotations

from recipes import sft

DATA_KIND = sft.DATA_KIND
ARGS_CLASS = sft.ARGS_CLASS
build = sft.build
