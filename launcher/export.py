"""`ftlaunch export RUN_DIR --merge`: fold a LoRA/QLoRA adapter into its base and write a full HF model.

QLoRA adapters are merged into the base loaded in 16/32-bit (dequantised), which is what people deploy; merging into
4-bit weights would round the adapter's update away.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.errors import UserError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def merge_adapter(run_dir: Path, out_dir: Path, dtype: str = "fp32") -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_cfg = json.loads((run_dir / "adapter_config.json").read_text())
    base_path = adapter_cfg["base_model_name_or_path"]
    auto = AutoModelForSequenceClassification if adapter_cfg.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    base = auto.from_pretrained(base_path, dtype=getattr(torch, DTYPES[dtype]))
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".partial")
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
    merge_adapter(run_dir, out, args.dtype)
    print(f"ftlaunch: merged model written to {out} ({args.dtype}); load it with "
          f"AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
