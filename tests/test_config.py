"""Recipe loading: every shipped recipe validates; bad input is one clean line (exit 2) with a fix."""
from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, run_inprocess
from launcher.config import RecipeConfig, apply_override, available_recipes, load_recipe
from launcher.errors import UserError


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_shipped_recipe_validates(name):
    cfg = load_recipe(name)
    assert isinstance(cfg, RecipeConfig) and cfg.name == name and cfg.output_dir


def test_overrides_are_typed_yaml_scalars():
    cfg = load_recipe("lora_tiny", overrides=["training.max_steps=7", "training.learning_rate=1e-4", "peft.r=32",
                                               "plan.zero_stage=null", "output_dir=/tmp/x", "data.packing=true"])
    assert cfg.training["max_steps"] == 7 and cfg.training["learning_rate"] == 1e-4
    assert cfg.peft.r == 32 and cfg.plan.zero_stage is None and cfg.output_dir == "/tmp/x" and cfg.data.packing
    assert load_recipe("lora_tiny", overrides=["data.path=my.jsonl"]).data.source == "my.jsonl"  # DESIGN.md's name
    # text PyYAML takes for a float and then cannot convert stays text (the fuzz tests found "._")
    assert load_recipe("lora_tiny", overrides=["description=._"]).description == "._"


@pytest.mark.parametrize("recipe,overrides,expected", [
    ("lora_tny", [], "unknown recipe 'lora_tny' (did you mean 'lora_tiny'?)"),
    ("lora_tiny", ["pef.r=3"], "unknown config key 'pef' (did you mean 'peft'?)"),
    ("lora_tiny", ["peft.rank=3"], "unknown config key 'peft.rank'"),
    ("lora_tiny", ["peft.r=abc"], "peft.r: expected an integer"),
    ("lora_tiny", ["peft.r=0"], "peft.r: must be a positive integer"),
    ("lora_tiny", ["peft.method=lroa"], "did you mean 'lora'?"),
    ("lora_tiny", ["training.learning_rate=-1"], "training.learning_rate: must be a positive number"),
    ("lora_tiny", ["plan.zero_stage=4"], "plan.zero_stage: must be 0, 1, 2 or 3"),
    ("lora_tiny", ["plan.memory_fraction=2"], "plan.memory_fraction"),
    ("lora_tiny", ["data.eval_ratio=1.5"], "data.eval_ratio"),
    ("lora_tiny", ["plan.offload=cpu"], "plan.offload: 'cpu' is not one of none, optimizer, all"),
    ("sft_tiny", ["quant.load_in_4bit=true"], "QLoRA trains adapters only"),
    ("lora_tiny", ["model.trust_remote_code=yes please"], "model.trust_remote_code: expected true or false"),
    ("lora_tiny", ["training"], "expected key=value"),
    ("lora_tiny", ["peft.r.x=1"], "'r' is not a section"),
])
def test_bad_config_is_one_clear_error(recipe, overrides, expected):
    with pytest.raises(UserError) as info:
        load_recipe(recipe, overrides=overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_input_exit_2_one_line_no_traceback(tmp_path):
    result = run_cli("--recipe", "lora_tiny", "pef.r=3", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines == ["ftlaunch: error: unknown config key 'pef' (did you mean 'peft'?); valid keys here: method, "
                     "description, output_dir, seed, model, peft, quant, data, plan, eval, safety, training, rm, ppo, "
                     "dpo, grpo, classify, pipeline"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_user_config_file_and_bad_yaml(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("method: sft\nmodel: {name: tiny}\ntraining: {max_steps: 3}\n")
    assert load_recipe(config_path=str(good)).training == {"max_steps": 3}
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sft\n  model: [\n")
    with pytest.raises(UserError, match="not valid YAML at line 2"):  # where the parser stopped
        load_recipe(config_path=str(bad))
    with pytest.raises(UserError, match="file not found"):
        load_recipe(config_path=str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="missing 'method'"):
        (tmp_path / "nomethod.yaml").write_text("model: {name: tiny}\n")
        load_recipe(config_path=str(tmp_path / "nomethod.yaml"))
    (tmp_path / "bin.yaml").write_bytes(b"method: sft\ndescription: \xff\xfe\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(config_path=str(tmp_path / "bin.yaml"))


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(config_path=str(evil))


def test_unknown_command_and_recipes_listing(capsys):
    assert run_inprocess("plna") == 2
    assert "unknown command 'plna' (did you mean 'plan'?)" in capsys.readouterr().err
    assert run_inprocess("recipes") == 0
    out = capsys.readouterr().out
    for name in ("sft_tiny", "lora_tiny", "qlora_tiny", "qlora_7b"):
        assert name in out


keys = st.text(alphabet=string.ascii_letters + "._-", min_size=1, max_size=20)
values = st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, values), max_size=5))
def test_fuzzed_overrides_never_crash(pairs):
    """Any override either loads or raises UserError with one line: nothing else escapes."""
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        load_recipe("lora_tiny", overrides=overrides)
    except UserError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(st.recursive(values | st.text(max_size=5), lambda inner: st.dictionaries(keys, inner, max_size=4)
                    | st.lists(inner, max_size=3), max_leaves=12))
def test_fuzzed_yaml_documents_never_crash(tmp_path_factory, doc):
    import yaml

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(config_path=str(path))
    except UserError as e:
        assert "\n" not in str(e)


def test_apply_override_creates_sections():
    raw: dict = {}
    apply_override(raw, "ppo.reward_model=runs/rm")
    assert raw == {"ppo": {"reward_model": "runs/rm"}}


# The trainer config class each method's recipe module builds (recipes/<method>.py).
TRAINER_CONFIGS = {"sft": ("trl", "SFTConfig"), "qlora": ("trl", "SFTConfig"), "rm": ("trl", "RewardConfig"),
                   "dpo": ("trl", "DPOConfig"), "grpo": ("trl", "GRPOConfig"),
                   "ppo": ("trl.experimental.ppo", "PPOConfig"), "classify": ("transformers", "TrainingArguments")}


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_every_recipe_training_section_builds_its_trainer_config(name, tmp_path):
    """Shipped recipes (the _7b ones included, which cannot train here) name only keys their trainer accepts: a
    transformers rename (warmup_ratio -> warmup_steps) breaks a recipe here, not on a user's GPU."""
    import importlib

    from recipes.common import make_args

    cfg = load_recipe(name)
    module, cls = TRAINER_CONFIGS[cfg.method]
    # the method-section keys recipes/dpo.py moves into the config, which training.loss_weights depends on
    extra = {"loss_type": cfg.section("dpo")["loss_type"]} if cfg.section("dpo").get("loss_type") else {}
    make_args(getattr(importlib.import_module(module), cls),
              {**cfg.training, **extra, "output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": []})


def test_method_value_rules_follow_the_installed_libraries():
    """The torch-free lists config_checks and shapes hold (recipes load without importing TRL or transformers)
    still name what TRL 1.12 and transformers accept: an upgrade that renames one fails here."""
    import dataclasses

    from transformers import LlamaConfig
    from trl import DPOConfig, GRPOConfig

    from launcher.config import METHOD_SECTION_KEYS
    from launcher.config_checks import DPO_LOSS_TYPES, GRPO_LOSS_TYPES, METHOD_SECTION_RULES
    from launcher.shapes import TINY_CONFIG_KEYS

    for section, rules in METHOD_SECTION_RULES.items():
        assert set(rules) <= set(METHOD_SECTION_KEYS[section]), section
    help_of = {cls: {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)} for cls in (DPOConfig,
                                                                                                       GRPOConfig)}
    assert all(f"'{name}'" in help_of[DPOConfig]["loss_type"] for name in DPO_LOSS_TYPES)
    assert all(f"'{name}'" in help_of[GRPOConfig]["loss_type"] for name in GRPO_LOSS_TYPES)
    assert set(TINY_CONFIG_KEYS) <= {f.name for f in dataclasses.fields(LlamaConfig)}
