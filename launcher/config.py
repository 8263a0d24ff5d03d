"""Recipe configuration: YAML file + `key=value` overrides -> validated RecipeConfig.

Torch-free on purpose: `ftlaunch plan` loads recipes and must not pay for importing torch.
Every bad input raises UserError with a one-line message naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from launcher.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
METHODS = ("sft", "qlora", "rm", "ppo", "dpo", "grpo", "classify")
RUNS_DIR = "runs"  # where runs go unless output_dir says otherwise


@dataclass
class ModelConfig:
    # Hub id, local directory, `tiny` (random Llama built from `tiny`), or `pkg:<package>` (a model shipped on PyPI).
    name: str = "tiny"
    tiny: Optional[dict] = None  # LlamaConfig kwargs for the tiny random model
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False  # never on unless the recipe says so
    attn_implementation: Optional[str] = "sdpa"
    tokenizer: Optional[str] = None  # defaults to the model's own
    # for a tokenizer without a chat template (a base model's) and chat data: a .jinja file, or a tokenizer (hub id or
    # directory) whose template to take, e.g. the model's -chat/-Instruct variant; a tokenizer's own template wins
    chat_template: Optional[str] = None


@dataclass
class PeftSection:
    method: Literal["none", "lora", "dora", "prompt_tuning", "prefix_tuning"] = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list] = "all-linear"
    num_virtual_tokens: int = 16  # prompt/prefix tuning


@dataclass
class QuantSection:
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass
class DataSection:
    source: Union[str, list] = "synthetic:arith"
    weights: Optional[list] = None
    split: str = "train"
    subset: Optional[str] = None
    eval_source: Optional[str] = None
    eval_ratio: float = 0.1
    format: Literal["auto", "text", "alpaca", "messages", "prompt_completion", "preference", "prompts",
                    "classification"] = "auto"
    columns: dict = field(default_factory=dict)
    num_examples: int = 2000
    max_length: int = 128
    too_long: Literal["truncate", "drop"] = "truncate"
    packing: bool = False


@dataclass
class PlanSection:
    """Hardware plan inputs. `None` means: let the planner choose."""

    inventory: Optional[str] = None  # what-if spec, e.g. 1xRTX3090-24GB; default: detect
    global_batch_size: int = 16
    zero_stage: Optional[int] = None
    offload: Optional[Literal["none", "optimizer", "all"]] = None
    micro_batch_size: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    memory_fraction: float = 0.9


@dataclass
class EvalSection:
    num_examples: int = 64  # held-out rows scored before/after training (the first n); 0 = no evaluation
    max_new_tokens: int = 8
    samples: int = 3  # generations printed in the summary


@dataclass
class SafetySection:
    max_grad_norm_abort: Optional[float] = None  # stop when the gradient norm exceeds this
    stop_on_nan: bool = True
    keep_checkpoints: int = 2


@dataclass
class RecipeConfig:
    method: Literal["sft", "qlora", "rm", "ppo", "dpo", "grpo", "classify"]
    description: str = ""
    output_dir: str = ""
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    quant: QuantSection = field(default_factory=QuantSection)
    data: DataSection = field(default_factory=DataSection)
    plan: PlanSection = field(default_factory=PlanSection)
    eval: EvalSection = field(default_factory=EvalSection)
    safety: SafetySection = field(default_factory=SafetySection)
    training: dict = field(default_factory=dict)  # TrainingArguments / TRL config names, checked by the recipe
    # Method-specific sections, free-form here and validated by the method module (rm, ppo, grpo, classify, ...)
    method_args: dict = field(default_factory=dict)
    name: str = ""  # the recipe's name (file stem), filled by the loader

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section(self, key: str) -> dict:
        return dict(self.method_args.get(key) or {})

    def __getattr__(self, key):  # cfg.ppo, cfg.rm ... read method sections as attributes
        if key.startswith("__") or key == "method_args":
            raise AttributeError(key)
        if key in self.method_args:
            return types.SimpleNamespace(**(self.method_args[key] or {}))
        raise AttributeError(key)


# Method sections allowed at top level besides the dataclass fields, with the keys each takes: the recipe module of
# the same name reads them (`pipeline` is read by launcher/pipeline.py, with any method). Checked when the recipe
# loads, so a typo fails before anything runs.
METHOD_SECTION_KEYS = {
    "rm": ("center_rewards_coefficient",),
    "ppo": ("reward_model", "value_model", "response_length", "num_ppo_epochs", "num_mini_batches", "kl_coef",
            "kl_estimator", "temperature", "missing_eos_penalty", "cliprange", "cliprange_value", "vf_coef", "gamma",
            "lam", "whiten_rewards", "local_rollout_forward_batch_size"),
    "dpo": ("beta", "loss_type"),
    "grpo": ("reward", "reward_weights", "num_generations", "max_completion_length", "beta", "temperature",
             "loss_type", "scale_rewards"),
    "classify": ("metric", "early_stopping_patience", "early_stopping_threshold", "eval_steps", "class_weights",
                 "freeze_layers", "num_labels"),
    "pipeline": ("output_dir", "stages", "description"),
}
METHOD_SECTIONS = tuple(METHOD_SECTION_KEYS)


class _Loader(yaml.SafeLoader):
    """Safe YAML, plus `1e-4` as a float (YAML 1.1 wants `1.0e-4`, a classic learning-rate trap)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def safe_load(text: str):
    return yaml.load(text, Loader=_Loader)


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_scalar(text: str) -> Any:
    """`key=value` values are YAML scalars: 1e-4, true, null, [a, b] all mean what they say."""
    try:
        return safe_load(text) if text != "" else ""
    except (yaml.YAMLError, ValueError):  # not YAML, or a float PyYAML cannot convert ("._"): the text itself
        return text


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override '{item}': expected key=value, e.g. training.max_steps=20")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override '{item}': empty key segment; use dotted keys like peft.r=32")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = parse_scalar(value)


def _check_type(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise UserError(f"{path}: {value!r} is not one of {', '.join(map(str, allowed))}"
                            f"{_did_you_mean(str(value), map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{path}: expected a string, got {value!r}")
        return value
    if tp in (dict, list) or origin in (dict, list):
        base = origin or tp
        if not isinstance(value, base):
            raise UserError(f"{path}: expected a {'mapping' if base is dict else 'list'}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return value


def _build(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path or 'recipe'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    internal = ("method_args", "name") if cls is RecipeConfig else ()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    kwargs: dict = {}
    extra: dict = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            if cls is RecipeConfig and key in METHOD_SECTIONS:
                if value is not None and not isinstance(value, dict):
                    raise UserError(f"{where}: expected a mapping of keys, got {value!r}")
                extra[key] = value or {}
                continue
            allowed = list(fields) + (list(METHOD_SECTIONS) if cls is RecipeConfig else [])
            raise UserError(f"unknown config key '{where}'{_did_you_mean(str(key), allowed)}; "
                            f"valid keys here: {', '.join(allowed)}")
        kwargs[key] = _check_type(where, value, hints[key])
    if cls is RecipeConfig:
        if "method" not in kwargs:
            raise UserError(f"recipe: missing 'method'; set it to one of {', '.join(METHODS)}")
        kwargs["method_args"] = extra
    return cls(**kwargs)


def load_recipe(name: Optional[str] = None, config_path: Optional[str] = None,
                overrides: Optional[list[str]] = None) -> RecipeConfig:
    """Resolve a named recipe or a user's YAML file, apply overrides, validate."""
    if bool(name) == bool(config_path):
        raise UserError("give exactly one of --recipe NAME or --config FILE (see `ftlaunch recipes`)")
    if name:
        recipes = available_recipes()
        if name not in recipes:
            raise UserError(f"unknown recipe '{name}'{_did_you_mean(name, recipes)}; "
                            f"run `ftlaunch recipes` to list them")
        path = recipes[name]
    else:
        path = Path(config_path)
        if not path.is_file():
            raise UserError(f"--config {config_path}: file not found")
    try:
        raw = safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:  # PyYAML: "._" resolves as a float, then fails
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        mark = getattr(e, "problem_mark", None)  # where the parser stopped: 0-based line and column
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where} ({first})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    data = raw.get("data")
    if isinstance(data, dict) and "path" in data:  # the shared contract's spelling (DESIGN.md) of data.source
        data["source"] = data.pop("path")
    cfg = _build(RecipeConfig, raw, "")
    cfg.name = path.stem
    if cfg.method == "qlora":
        cfg.quant.load_in_4bit = True
    if not cfg.output_dir:
        cfg.output_dir = str(Path(RUNS_DIR) / cfg.name)
    from launcher.config_checks import check_recipe

    check_recipe(cfg)
    return cfg


def describe(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False)


def to_yaml_dict(cfg: RecipeConfig) -> dict:
    """The resolved recipe as it would be written in a YAML file (method sections flattened back)."""
    out = cfg.to_dict()
    out.pop("name", None)
    out.update(out.pop("method_args") or {})
    return out


# Override keys whose values are local paths (data.source may be a list of them): a job started elsewhere (the
# sbatch scripts run in the checkout) needs them absolute.
PATH_KEYS = ("data.source", "data.path", "data.eval_source", "output_dir", "model.name", "model.tokenizer",
             "model.chat_template", "ppo.reward_model", "ppo.value_model", "grpo.reward")


def absolute_path(text: str) -> str:
    return text if text.startswith(("/", "~")) else str(Path.cwd() / text)


def absolute_path_override(item: str) -> str:
    """`key=relative/path` -> `key=/abs/path` for path keys: output_dir always, other paths when they exist here
    (a hub id or a reward name stays as typed)."""
    key, _, value = item.partition("=")
    if key not in PATH_KEYS:
        return item
    parsed = parse_scalar(value)
    is_path = lambda v: isinstance(v, str) and v and (key == "output_dir" or Path(v).exists())  # noqa: E731
    if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed) and any(is_path(v) for v in parsed):
        return f"{key}=[{', '.join(absolute_path(v) if is_path(v) else v for v in parsed)}]"
    return f"{key}={absolute_path(value)}" if is_path(parsed) and parsed == value else item  # else: as typed
