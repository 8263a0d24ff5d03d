"""`ftlaunch export RUN_DIR --merge`: fold a LoRA/QLoRA adapter into its base and write a full HF model.

A QLoRA adapter was trained against the NF4-quantised base, not the original weights. By default it is merged into
that base *dequantised* (`--base dequantized`): the merged model then computes what the adapter model computed in
training, up to float rounding. `--base original` merges into the original 16/32-bit weights instead (what most
tools do; the result differs from the trained model by the 4-bit quantisation error). Merging into 4-bit weights is
not offered: re-quantising would round the adapter's update away.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from launcher.errors import UserError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BASES = ("dequantized", "original")


def trained_in_4bit(run_dir: Path) -> dict | None:
    """The run's `quant:` section when its base was loaded in 4-bit (from the resolved recipe.yaml), else None."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except OSError:
        return None
    quant = recipe.get("quant") or {}
    return quant if (quant.get("load_in_4bit") or recipe.get("method") == "qlora") else None


def load_base(base_path: str, auto, dtype, quant: dict | None):
    """The base the adapter is merged into: dequantised NF4 (quant given) or the original weights."""
    if quant is None:
        return auto.from_pretrained(base_path, dtype=dtype)
    from transformers import BitsAndBytesConfig

    from recipes.builder import same_4bit_kernels

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
                                bnb_4bit_use_double_quant=quant.get("double_quant", True),
                                bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    base = auto.from_pretrained(base_path, dtype=dtype, quantization_config=config)
    same_4bit_kernels(base)
    return base.dequantize(dtype=dtype)


def merge_adapter(run_dir: Path, out_dir: Path, dtype: str = "fp32", base: str = "dequantized") -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_cfg = json.loads((run_dir / "adapter_config.json").read_text())
    base_path = adapter_cfg["base_model_name_or_path"]
    auto = AutoModelForSequenceClassification if adapter_cfg.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    quant = trained_in_4bit(run_dir) if base == "dequantized" else None
    model = load_base(base_path, auto, getattr(torch, DTYPES[dtype]), quant)
    merged = PeftModel.from_pretrained(model, run_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer_dir = run_dir if (run_dir / "tokenizer_config.json").exists() else Path(base_path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    tmp.rename(out_dir)  # only a complete export becomes visible
    return out_dir


def cmd_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftlaunch export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into its base (required for now)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--base", choices=BASES, default="dequantized",
                        help="QLoRA only: merge into the dequantised 4-bit base it was trained on (default), or "
                             "into the original weights")
    parser.add_argument("--out", help="where to write the merged model (default: RUN_DIR/merged)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"export: {run_dir} is not a directory")
    if not (run_dir / "adapter_config.json").exists():
        raise UserError(f"export: {run_dir} holds no adapter (adapter_config.json); a full fine-tune is already a "
                        f"complete HF model there")
    if not args.merge:
        raise UserError("export: pass --merge to write the adapter merged into its base")
    out = Path(args.out) if args.out else run_dir / "merged"
    if out.exists():
        raise UserError(f"export: {out} already exists; remove it or pass --out elsewhere")
    merge_adapter(run_dir, out, args.dtype, args.base)
    how = " (dequantised 4-bit base)" if args.base == "dequantized" and trained_in_4bit(run_dir) else ""
    print(f"ftlaunch: merged model written to {out} ({args.dtype}{how}); load it with "
          f"AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
