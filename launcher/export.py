"""`ftlaunch export RUN_DIR --merge`: fold a LoRA/QLoRA adapter into its base and write a full HF model.

A QLoRA adapter was trained against the NF4-quantised base, not the original weights. By default it is merged into
that base *dequantised* (`--base dequantized`): the merged model then computes what the adapter model computed in
training, up to float rounding. `--base original` merges into the original 16/32-bit weights instead (what most
tools do; the result differs from the trained model by the 4-bit quantisation error). Merging into 4-bit weights is
not offered: re-quantising would round the adapter's update away.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from launcher.errors import ArgParser, UserError, writable_dir
from launcher.memory import PRECISION_DTYPES as DTYPES

BASES = ("dequantized", "original")
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")  # peft types that learn inputs, not weight deltas


def merge_adapter(run_dir: Path, out_dir: Path, dtype: str = "auto", base: str = "dequantized") -> Path:
    import torch

    from recipes.merge import merge_adapter as merged_model, save_merged

    model, tokenizer_dir = merged_model(run_dir, getattr(torch, DTYPES[dtype]) if dtype in DTYPES else None, base)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    save_merged(model, tokenizer_dir, tmp)
    tmp.rename(out_dir)  # only a complete export becomes visible
    return out_dir


def cmd_export(argv: list[str]) -> int:
    parser = ArgParser(prog="ftlaunch export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into its base (required for now)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="of the merged weights; auto (default): the base model's own dtype, as it is stored")
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
        if (run_dir / "config.json").exists():
            raise UserError(f"export: {run_dir} holds a full fine-tune, already a complete HF model there; load it "
                            f"with from_pretrained('{run_dir}')")
        raise UserError(f"export: {run_dir} holds no trained adapter (adapter_config.json): its run has not "
                        f"finished; run it again with the same output_dir to resume and finish it")
    if not args.merge:
        raise UserError("export: pass --merge to write the adapter merged into its base")
    adapter_cfg = _adapter_config(run_dir)
    peft_type = adapter_cfg.get("peft_type", "")
    if peft_type in PROMPT_LEARNING:
        raise UserError(f"export: {run_dir} holds a {peft_type.lower()} adapter: it adds virtual tokens to the input "
                        f"and has no weights to merge; load it with PeftModel.from_pretrained(base, '{run_dir}')")
    out = Path(args.out) if args.out else run_dir / "merged"
    if out.exists():
        raise UserError(f"export: {out} already exists; remove it or pass --out elsewhere")
    writable_dir(out.parent, "--out")  # before the merge, which takes minutes
    _check_base(run_dir, adapter_cfg.get("base_model_name_or_path"))
    from recipes.merge import trained_in_4bit

    written = json.loads((merge_adapter(run_dir, out, args.dtype, args.base) / "config.json").read_text())
    model_dtype = written.get("dtype") or written.get("torch_dtype")
    how = " (dequantised 4-bit base)" if args.base == "dequantized" and trained_in_4bit(run_dir) else ""
    auto = "AutoModelForSequenceClassification" if adapter_cfg.get("task_type") == "SEQ_CLS" else "AutoModelForCausalLM"
    print(f"ftlaunch: merged model written to {out} ({model_dtype}{how}); load it with {auto}.from_pretrained('{out}')")
    return 0


def _adapter_config(run_dir: Path) -> dict:
    path = run_dir / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"export: cannot read {path} ({e}); restore it from the run's last checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"export: {path} is not a JSON object; restore it from the run's last checkpoint")
    return data


def _check_base(run_dir: Path, base) -> None:
    """The adapter's base loads (its config) before the merge starts: a moved or deleted base directory otherwise
    fails deep in transformers, with a hub-id error about a local path."""
    where = f"base_model_name_or_path in {run_dir / 'adapter_config.json'}"
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"export: {where} is missing; set it to the base model's directory or hub id")
    path = Path(base).expanduser()
    if path.is_absolute() or base.startswith((".", "~")) or path.exists():  # a local directory, not a hub id
        if not (path / "config.json").is_file():
            state = "has no config.json" if path.is_dir() else "does not exist"
            raise UserError(f"export: the base model {base} ({where}) {state}; point it at the base model's "
                            f"directory")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"export: the base model '{base}' ({where}) cannot be loaded ({first}); download it, or "
                        f"point {where.split(' in ')[0]} at a local copy") from None
