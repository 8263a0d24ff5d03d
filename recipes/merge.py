"""Adapters folded into their base: `ftlaunch export --merge`, and an earlier stage's adapter that a later one
starts from (`model.name` / `ppo.reward_model` / `grpo.reward` naming an adapter directory), merged once and cached."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from recipes.builder import _publish_dir, bnb_4bit_config, cache_dir, from_pretrained, rng_untouched

def trained_in_4bit(run_dir) -> dict | None:
    """The run's `quant:` section when its base was loaded in 4-bit (from the resolved recipe.yaml), else None."""
    import yaml

    try:
        recipe = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
    except OSError:
        return None
    quant = recipe.get("quant") or {}
    return quant if (quant.get("load_in_4bit") or recipe.get("method") == "qlora") else None


def adapter_head_labels(adapter_dir) -> int | None:
    """Outputs of the classification head an adapter carries (peft saves the head whole, as modules_to_save): a
    reward model's is 1, which the base's config does not know."""
    import re

    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if re.search(r"\.(score|classifier|classifier\.out_proj)(\.modules_to_save\.default)?\.weight$", key):
                return int(f.get_slice(key).get_shape()[0])
    return None


def merge_adapter(adapter_dir, dtype=None, base: str = "dequantized", auto_class=None, **load_kwargs):
    """(model, tokenizer source): the adapter's base with the adapter folded in, a plain transformers model.

    A QLoRA adapter was trained against the NF4-quantised base, not the original weights: `base="dequantized"`
    merges it into that base dequantised, so the merged model computes what the adapter model computed in
    training, up to float rounding; `base="original"` merges into the original weights (what most tools do; off by
    the 4-bit quantisation error). Sequence-classification adapters get their head size from the adapter itself.
    `dtype` None: the base's own dtype (its config's), as most tools save a merge: a 7B QLoRA base dequantised to
    fp32 would be 28 GB on disk and in host RAM, for a model every later stage loads in 16 bits anyway.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_dir = Path(adapter_dir)
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_path = adapter_cfg["base_model_name_or_path"]
    kwargs = dict(load_kwargs, **({"dtype": dtype} if dtype is not None else {}))
    if adapter_cfg.get("task_type") == "SEQ_CLS":
        auto_class = auto_class or AutoModelForSequenceClassification
        labels = adapter_head_labels(adapter_dir)
        if labels:
            kwargs.setdefault("num_labels", labels)
    auto_class = auto_class or AutoModelForCausalLM
    quant = trained_in_4bit(adapter_dir) if base == "dequantized" else None
    compute = dtype or stored_dtype(base_path)
    config = bnb_4bit_config(quant.get("quant_type", "nf4"), quant.get("double_quant", True), compute) if quant else None
    model = from_pretrained(auto_class, base_path, config, **kwargs)
    if config is not None:
        model = model.dequantize(dtype=compute)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    return merged, str(tokenizer_dir)


def stored_dtype(path: str):
    """The dtype a model's config says its weights are stored in (float32 when it does not say); read from the raw
    config, so a custom-code model needs no trust_remote_code for it."""
    import torch
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(path)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_merged(model, tokenizer_dir: str, out_dir) -> None:
    """Model (safetensors) and tokenizer, as one HF directory; a classifier learns its pad token from the
    tokenizer, or it could not score a padded batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def is_adapter_dir(path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def merged_dir(adapter_dir, auto_class=None, every_rank: bool = False, **load_kwargs) -> Path:
    """A full-model copy of `adapter_dir` (base + adapter, merged), made once and cached next to the tiny models.

    Adapter outputs of earlier runs (SFT LoRA/QLoRA, RM LoRA) are merged before use as a model (PPO's reward/value
    code also calls `model.score` on the backbone), the way `ftlaunch export --merge` merges them (QLoRA into its
    dequantised base). `every_rank`: every rank calls this at the same point (a recipe's build), so they coordinate.
    """
    import torch.distributed as dist

    adapter_dir = Path(adapter_dir).resolve()
    if every_rank and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # each node's first rank merges while the others wait, then all find its copy: every rank merging would hold
        # a whole base model per rank in host RAM (and put each rank's 4-bit base on one GPU). A failing merge ends
        # its rank, and the launcher stops the others.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _merged_copy(adapter_dir, auto_class, load_kwargs)
        dist.barrier()
    return _merged_copy(adapter_dir, auto_class, load_kwargs)


def _merged_copy(adapter_dir: Path, auto_class, load_kwargs: dict) -> Path:
    # "v": how merging is done (2: QLoRA adapters into their dequantised base; 3: in the base's own dtype, not fp32);
    # a change must not reuse old copies
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(adapter_dir.iterdir()) if p.is_file()]
    key = hashlib.sha256(json.dumps({"d": str(adapter_dir), "f": stamp, "k": sorted(map(str, load_kwargs.items())),
                                     "c": getattr(auto_class, "__name__", None), "v": 3}).encode()).hexdigest()
    final = cache_dir() / "merged" / f"{adapter_dir.name}-{key[:16]}"
    if (final / "config.json").is_file():
        return final
    with rng_untouched():
        model, tokenizer_dir = merge_adapter(adapter_dir, auto_class=auto_class, **load_kwargs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=final.parent))
    save_merged(model, tokenizer_dir, tmp)
    _publish_dir(tmp, final)
    return final
