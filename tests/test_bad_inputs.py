"""Bad input, end to end: every case is one line on stderr naming what is wrong and how to fix it, exit code 2, no
traceback, and no half-created output directory.

tests/test_config.py covers the recipe loader itself (15 parametrised config cases + YAML/CLI cases); the cases here go
through `ftlaunch run` / `ftlaunch plan` (in-process, fast), and a few through the real command line."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, deepspeed_cmd, run_cli, run_inprocess


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def good_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)]


NOISE = re.compile(r"\[\d\d:\d\d|%\||^Failed to load JSON from file")  # datasets' progress bars and logger


@pytest.fixture(autouse=True)
def _quiet_datasets():
    """In-process runs: silence datasets' progress bars and logger, so stderr holds exactly what ftlaunch says.
    (Through the real CLI they still print; the subprocess tests filter them with NOISE.)"""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    yield
    datasets.enable_progress_bars()
    datasets.logging.set_verbosity_warning()


def assert_clean_failure(code: int, err: str, out_dir: Path, *expected: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not NOISE.search(line)]
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("ftlaunch: error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err
    assert not out_dir.exists(), f"half-created output directory: {sorted(p.name for p in out_dir.iterdir())}"


# ---- `ftlaunch run`, in-process: config, combinations, resume, safety -------------------------------------------

def _data(tmp_path: Path, kind: str) -> str:
    """A data file for one bad-data case; returns its path."""
    if kind == "missing_file":
        return str(tmp_path / "nope.jsonl")
    if kind == "empty":
        p = tmp_path / "empty.jsonl"
        p.write_text("", encoding="utf-8")
        return str(p)
    if kind == "missing_field":
        rows = good_rows(4)
        rows[2] = {"prompt": "7+1="}
        return str(write_jsonl(tmp_path / "rows.jsonl", rows))
    if kind == "non_utf8":
        p = tmp_path / "latin.jsonl"
        p.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
        return str(p)
    if kind == "identical_pair":
        rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "same", "rejected": "same"}]
        return str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    if kind == "too_long_all_dropped":
        rows = [{"prompt": "1+1=" * 40, "completion": "2"} for _ in range(6)]
        return str(write_jsonl(tmp_path / "long.jsonl", rows))
    if kind == "bad_json":
        return str(write_jsonl(tmp_path / "broken.jsonl", [json.dumps(good_rows(1)[0]), '{"prompt": "2+1=", ']))
    if kind == "bad_extension":
        p = tmp_path / "data.txt"
        p.write_text("hello\n")
        return str(p)
    if kind == "bad_role":
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}]
        return str(write_jsonl(tmp_path / "chat.jsonl", rows))
    if kind == "undetectable":
        return str(write_jsonl(tmp_path / "odd.jsonl", [{"question": "1+1", "answer": "2"}]))
    if kind == "three_classes":  # 10 rows: a 0.2 eval split has fewer rows than labels (no stratified split)
        return str(write_jsonl(tmp_path / "cls.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(10)]))
    raise AssertionError(kind)


BAD_RUNS = [
    # id, recipe, overrides, data kind (None: no file), expected fragments of the one line
    ("wrong_type_seed", "lora_tiny", ["seed=abc"], None, ["seed: expected an integer"]),
    ("range_max_length", "lora_tiny", ["data.max_length=4"], None, ["data.max_length: must be at least 8"]),
    ("range_num_examples", "lora_tiny", ["data.num_examples=0"], None, ["data.num_examples: must be positive"]),
    ("range_eval_examples", "cls_tiny", ["eval.num_examples=-5"], None, ["eval.num_examples: must be 0"]),
    ("range_seed", "lora_tiny", ["seed=-1"], None, ["seed: must be in [0, 2**32)"]),
    ("training_value_type", "lora_tiny", ["training.weight_decay=abc"], None,
     ["training.weight_decay: expected a number, got 'abc'"]),
    ("training_value_range", "lora_tiny", ["training.save_steps=-1"], None, ["training.save_steps: must be > 0"]),
    ("attention_flash_on_cpu", "lora_tiny", ["model.attn_implementation=flash_attention_2"], None,
     ["model.attn_implementation: flash_attention_2 runs on CUDA GPUs only"]),
    ("attention_unknown", "lora_tiny", ["model.attn_implementation=fast"], None,
     ["model.attn_implementation: 'fast' is not one of sdpa"]),
    ("lora_target_not_in_model", "lora_tiny", ["peft.target_modules=[foo_proj]"], None,
     ["peft.target_modules: 'foo_proj' not in this model", "q_proj"]),
    ("range_max_steps", "lora_tiny", ["training.max_steps=0"], None, ["training.max_steps: must be a positive"]),
    ("enum_training_value", "lora_tiny", ["training.optim=adamw_torhc"], None,
     ["training.optim: 'adamw_torhc' is not a valid OptimizerNames (did you mean adamw_torch?)"]),
    ("unknown_training_key", "lora_tiny", ["training.learning_rat=1e-3"], None,
     ["training.learning_rat", "did you mean 'training.learning_rate'"]),
    ("unknown_method_section_key", "ppo_tiny", ["ppo.kl_coeff=0.1"], None,
     ["ppo.kl_coeff", "did you mean 'kl_coef'"]),
    ("section_of_another_method", "lora_tiny", ["dpo.beta=0.2"], None,
     ["dpo: this section is read by method dpo only", "method is sft"]),
    ("plan_owned_training_key", "lora_tiny", ["training.per_device_train_batch_size=4"], None,
     ["training.per_device_train_batch_size: set by plan.micro_batch_size"]),
    ("bad_format_name", "lora_tiny", ["data.format=jsonl"], None, ["data.format: 'jsonl' is not one of"]),
    ("missing_model_path", "lora_tiny", ["model.name=/nonexistent"], None, ["'/nonexistent'", "config.json"]),
    ("hub_model_not_reachable", "qlora_7b", ["data.source=synthetic:arith"], None,
     ["model.name: cannot load 'meta-llama/Llama-2-7b-hf'", "HF_HUB_OFFLINE=1"]),
    ("qlora_full_finetune", "qlora_tiny", ["peft.method=none"], None, ["QLoRA trains adapters only"]),
    ("ppo_without_reward_model", "ppo_tiny", ["ppo.reward_model=null"], None, ["ppo.reward_model"]),
    ("ppo_hub_reward_model_not_reachable", "ppo_tiny", ["ppo.reward_model=acme/no-such-rm"], None,
     ["ppo.reward_model: cannot load 'acme/no-such-rm'", "HF_HUB_OFFLINE=1"]),
    ("grpo_hub_reward_model_not_reachable", "grpo_tiny", ["grpo.reward=acme/no-such-rm"], None,
     ["grpo.reward: cannot load 'acme/no-such-rm'", "HF_HUB_OFFLINE=1"]),
    ("grpo_missing_reward_model_dir", "grpo_tiny", ["grpo.reward=runs/no/such-rm"], None,
     ["grpo.reward: 'runs/no/such-rm' does not exist"]),
    ("micro_batch_not_dividing", "lora_tiny", ["plan.micro_batch_size=5"], None, ["plan.micro_batch_size=5"]),
    ("keep_checkpoints_zero", "lora_tiny", ["safety.keep_checkpoints=0"], None, ["safety.keep_checkpoints"]),
    ("grad_norm_abort_negative", "lora_tiny", ["safety.max_grad_norm_abort=-1"], None,
     ["safety.max_grad_norm_abort"]),
    ("data_missing_file", "lora_tiny", [], "missing_file", ["nope.jsonl: file not found"]),
    ("data_empty", "lora_tiny", [], "empty", ["empty.jsonl: the file is empty"]),
    ("data_row_missing_field", "lora_tiny", [], "missing_field", ["rows.jsonl row 3", "'completion'"]),
    ("data_non_utf8", "lora_tiny", [], "non_utf8", ["latin.jsonl line 2", "not valid UTF-8"]),
    ("data_identical_preference", "dpo_tiny", [], "identical_pair", ["pairs.jsonl row 2", "identical"]),
    ("data_too_long_all_dropped", "lora_tiny", ["data.too_long=drop", "data.max_length=16"], "too_long_all_dropped",
     ["no rows left after dropping over-long ones"]),
    ("data_bad_json", "lora_tiny", [], "bad_json", ["broken.jsonl"]),
    ("data_bad_extension", "lora_tiny", [], "bad_extension", ["unsupported file type '.txt'"]),
    ("data_bad_role", "lora_tiny", [], "bad_role", ["role 'robot'"]),
    ("data_undetectable_format", "lora_tiny", [], "undetectable", ["cannot tell the data format", "data.format"]),
    ("labels_beyond_num_labels", "cls_tiny", ["classify.num_labels=2", "data.eval_ratio=0.2"], "three_classes",
     ["classify.num_labels: 2, but the data has 3 labels", "classify.num_labels=3"]),
]


@pytest.mark.parametrize("case,recipe,overrides,data,expected", BAD_RUNS, ids=[c[0] for c in BAD_RUNS])
def test_bad_run_input(case, recipe, overrides, data, expected, tmp_path, capsys):
    out = tmp_path / "out"
    extra = [f"data.source={_data(tmp_path, data)}"] if data else []
    code = run_inprocess("run", "--recipe", recipe, f"output_dir={out}", "training.max_steps=2", "data.num_examples=32",
                         *extra, *overrides)
    assert_clean_failure(code, capsys.readouterr().err, out, *expected)


BAD_VALUES = [
    # recipe, override, expected fragment of the one line: refused when the recipe loads, so by every command
    ("ppo_tiny", "ppo.response_length=abc", "ppo.response_length: must be a positive integer, got 'abc'"),
    ("ppo_tiny", "ppo.response_length=0", "ppo.response_length: must be a positive integer, got 0"),
    ("ppo_tiny", "ppo.num_ppo_epochs=abc", "ppo.num_ppo_epochs: must be a positive integer"),
    ("ppo_tiny", "ppo.kl_coef=-1", "ppo.kl_coef: must be a number >= 0, got -1"),
    ("ppo_tiny", "ppo.num_mini_batches=0", "ppo.num_mini_batches: must be a positive integer"),
    ("grpo_tiny", "grpo.num_generations=abc", "grpo.num_generations: must be an integer >= 2, got 'abc'"),
    ("grpo_tiny", "grpo.num_generations=2.5", "grpo.num_generations: must be an integer >= 2, got 2.5"),
    ("grpo_tiny", "grpo.max_completion_length=abc", "grpo.max_completion_length: must be a positive integer"),
    ("grpo_tiny", "grpo.temperature=-1", "grpo.temperature: must be a number > 0, got -1"),
    ("grpo_tiny", "grpo.loss_type=dapoo", "(did you mean 'dapo'?)"),
    ("grpo_tiny", "grpo.reward_weights=[1, 2]", "grpo.reward_weights: give one weight per reward (1), got 2"),
    ("grpo_tiny", "grpo.reward=[]", "grpo.reward: must be a reward function name"),
    ("grpo_tiny", "eval.max_new_tokens=-3", "eval.max_new_tokens: must be a positive integer, got -3"),
    ("dpo_tiny", "dpo.loss_type=sigmoidd", "dpo.loss_type: must be one of sigmoid, hinge"),
    ("dpo_tiny", "dpo.loss_type=[sigmoid, hingee]", "(did you mean 'hinge'?)"),
    ("dpo_tiny", "dpo.beta=-1", "dpo.beta: must be a number > 0, got -1"),
    ("cls_tiny", "classify.freeze_layers=-1", "classify.freeze_layers: must be an integer >= 0, got -1"),
    ("cls_tiny", "classify.metric=f2", "classify.metric: must be one of accuracy, f1, got 'f2'"),
    ("cls_tiny", "classify.num_labels=1", "classify.num_labels: must be an integer >= 2"),
    ("lora_tiny", "training.learning_rate=.inf", "training.learning_rate: must be a finite number, got inf"),
    ("lora_tiny", "training.max_grad_norm=.nan", "training.max_grad_norm: must be a finite number, got nan"),
    ("lora_tiny", "peft.alpha=-5", "peft.alpha: must be a positive integer"),
    ("lora_tiny", "peft.target_modules=[]", "peft.target_modules: empty"),
    ("lora_tiny", "model.tiny={hidden_size: -64}", "model.tiny: 'hidden_size' must be a positive integer, got -64"),
    ("lora_tiny", "model.tiny={hidden_sizee: 64}", "'model.tiny.hidden_sizee' (did you mean 'hidden_size'?)"),
    ("lora_tiny", "model.tiny={vocab_size: 100}", "model.tiny: 'vocab_size' must be at least the tiny tokenizer's"),
    ("lora_tiny", "plan.global_batch_size=99999999999999999999", "plan.global_batch_size: must be in [1, 1048576]"),
    ("lora_tiny", "plan.inventory=2xFOO", "plan.inventory: inventory spec '2xFOO'"),
]


@pytest.mark.parametrize("recipe,override,expected", BAD_VALUES, ids=[c[1] for c in BAD_VALUES])
def test_bad_values_are_refused_by_plan(recipe, override, expected, tmp_path, capsys):
    """Values of the right key but a wrong type or range: `ftlaunch plan` refuses them as `run` would."""
    assert_clean_failure(run_inprocess("plan", "--recipe", recipe, override), capsys.readouterr().err,
                         tmp_path / "out", expected)


@pytest.mark.parametrize("argv", [["slurm", "--recipe", "dpo_tiny", "dpo.beta=-1"],
                                  ["pipeline", "rlhf_tiny", "--dry-run", "ppo:ppo.kl_coef=-1"]],
                         ids=["slurm", "pipeline_dry_run"])
def test_bad_values_are_refused_by_slurm_and_pipeline(argv, tmp_path, capsys):
    assert_clean_failure(run_inprocess(*argv), capsys.readouterr().err, tmp_path / "out", "must be a number")


def test_resume_from_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "--resume", str(tmp_path / "ckpt-9"),
                         "data.num_examples=32")  # overrides on both sides of --resume
    assert_clean_failure(code, capsys.readouterr().err, out, "--resume", "no such checkpoint directory")


def test_recipe_and_config_both_given(tmp_path, capsys):
    out = tmp_path / "out"
    code = run_inprocess("run", "--recipe", "lora_tiny", "--config", str(tmp_path / "x.yaml"), f"output_dir={out}")
    assert_clean_failure(code, capsys.readouterr().err, out, "give exactly one of --recipe NAME or --config FILE")


def test_global_batch_not_divisible_by_ranks(tmp_path, capsys, monkeypatch):
    """What each of 2 deepspeed ranks sees (RANK/LOCAL_RANK/WORLD_SIZE set): refused before anything starts."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "plan.global_batch_size=3")
    assert_clean_failure(code, capsys.readouterr().err, out, "plan.global_batch_size=3", "2")


def test_prefix_tuning_never_plans_checkpointing(capsys):
    """Prefix tuning with checkpointing fails in transformers (the prefix's past key values are dropped on
    recompute): the planner leaves it off where LoRA would turn it on, and a pin is refused in one line."""
    import json

    args = ["plan", "--recipe", "lora_7b", "--inventory", "1xRTX3090-24GB", "--json"]
    assert run_inprocess(*args) == 0
    assert json.loads(capsys.readouterr().out)["gradient_checkpointing"] is True  # what LoRA gets here
    assert run_inprocess(*args, "peft.method=prefix_tuning") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gradient_checkpointing"] is False and any("prefix_tuning: no gradient" in r for r in plan["reasons"])
    assert run_inprocess("plan", "--recipe", "sft_tiny", "peft.method=prefix_tuning",
                         "plan.gradient_checkpointing=true") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan.gradient_checkpointing: prefix tuning cannot" in err, err


def test_plan_global_batch_not_divisible(capsys):
    code = run_inprocess("plan", "--recipe", "lora_tiny", "--inventory", "2xcpu", "plan.global_batch_size=3")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "plan.global_batch_size=3" in err, err


def test_plan_impossible_inventory(capsys):
    assert run_inprocess("plan", "--recipe", "lora_tiny", "--inventory", "3xfoo") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inventory spec '3xfoo'" in err and "foo" in err, err


@pytest.mark.parametrize("argv,expected", [
    (["plan", "--zero-stage", "5"], "argument --zero-stage: invalid choice"),
    (["run", "--recipe", "lora_tiny", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["check", "--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
    (["export"], "the following arguments are required: run_dir"),
    (["runs", "--nope"], "unrecognized arguments: --nope"),
], ids=["plan", "run", "check", "export", "runs"])
def test_bad_arguments_are_one_line_not_a_usage_block(argv, expected, tmp_path, capsys):
    """argparse's own errors follow the contract too: one line naming the argument and pointing at --help."""
    code = run_inprocess(*argv)
    assert_clean_failure(code, capsys.readouterr().err, tmp_path / "out", expected, f"ftlaunch {argv[0]} --help")


@pytest.mark.parametrize("argv,expected", [
    (["plan", "--model", "llama-2-7b", "--lora-r", "8"], "--lora-r: applies to --method lora or qlora, not full"),
    (["plan", "--model", "llama-2-7b", "--micro-batch", "0"], "--micro-batch: must be positive, got 0"),
    (["plan", "--model", "llama-2-7b", "--optim", "adamw_torhc"], "(did you mean adamw_torch?)"),
    (["check", "--ranks-per-node", "0"], "--ranks-per-node: must be positive, got 0"),
    (["check", "--timeout", "nan"], "--timeout: must be a number of seconds in (0, 86400], got nan"),
    (["check", "--timeout", "inf"], "--timeout: must be a number of seconds in (0, 86400], got inf"),
    (["plan", "--recipe", "lora_tiny", "--inventory", "1xA100", "--host-ram", "nan"], "--host-ram: must be a positive"),
    (["plan", "--recipe", "lora_tiny", "--inventory", "1xA100", "--host-ram", "inf"], "--host-ram: must be a positive"),
    (["plan", "--recipe", "lora_tiny", "--inventory", ""], "--inventory: empty"),
    (["inventory", "--inventory", ""], "--inventory: empty"),
    (["plan", "--model", "llama-2-7b", "--global-batch", "99999999999"], "--global-batch: must be at most 1048576"),
    (["plan", "--model", "llama-2-7b", "--inventory", "8xA100", "--global-batch", "12"], "--global-batch 12 is not"),
], ids=["lora_r_full", "micro_0", "optim", "ranks_per_node", "timeout_nan", "timeout_inf", "host_ram_nan",
        "host_ram_inf", "plan_inventory_empty", "inventory_empty", "global_batch_huge", "model_mode_flag_names"])
def test_argument_values_argparse_accepts_but_mean_nothing(argv, expected, tmp_path, capsys):
    """Values of the right type that would be ignored or mean nothing: refused in one line, not planned around."""
    assert_clean_failure(run_inprocess(*argv), capsys.readouterr().err, tmp_path / "out", expected)


@pytest.mark.parametrize("command", ["run", "plan", "inventory", "recipes", "pipeline", "slurm", "check", "export",
                                     "runs"])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        run_inprocess(command, "--help")
    assert exited.value.code == 0 and f"usage: ftlaunch {command}" in capsys.readouterr().out


def test_plan_model_mode_suggests_flags_not_recipe_keys(capsys):
    """`plan --model` takes --seq-len, not data.max_length: its 'would fit' advice names the flag it takes."""
    code = run_inprocess("plan", "--model", "llama-2-7b", "--inventory", "1xA100", "--seq-len", "99999999")
    err = capsys.readouterr().err
    assert code == 3 and "would fit: --seq-len " in err and "data.max_length" not in err, err


def test_plan_model_dir_with_bad_sizes(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": -4096, "num_hidden_layers": 32,
                                                   "num_attention_heads": 32, "vocab_size": 32000}))
    code = run_inprocess("plan", "--model", str(model), "--inventory", "1xA100")
    assert_clean_failure(code, capsys.readouterr().err, tmp_path / "out", "'hidden_size' must be a positive integer")


@pytest.mark.parametrize("adapter_config,expected", [
    ("{bad json", "adapter_config.json (Expecting property name"),
    ('{"peft_type": "LORA", "base_model_name_or_path": "/no/base"}', "the base model /no/base"),
    ('{"peft_type": "LORA"}', "base_model_name_or_path in"),
], ids=["bad_json", "base_missing", "no_base"])
def test_export_of_a_broken_adapter_dir(adapter_config, expected, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text(adapter_config)
    assert_clean_failure(run_inprocess("export", str(run_dir), "--merge"), capsys.readouterr().err,
                         run_dir / "merged", expected)


def test_unwritable_output_is_one_line(tmp_path, capsys):
    """An output_dir that is a file, or under one, fails before anything loads; so does slurm --write."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for target, expected in ((a_file, "exists and is not a directory"), (a_file / "run", "cannot write to")):
        code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={target}")
        assert_clean_failure(code, capsys.readouterr().err, tmp_path / "out", "output_dir: ", expected)
    code = run_inprocess("slurm", "--recipe", "lora_tiny", "--write", str(a_file / "job.sbatch"))
    assert_clean_failure(code, capsys.readouterr().err, tmp_path / "out", "--write: ")
    assert a_file.read_text() == "mine"


def test_lora_targets_are_matched_as_peft_matches_them():
    """List entries match a module's full name or a dotted suffix; a single string is a regular expression over
    full names (so 'q_proj' alone matches nothing, as in PEFT, and says so)."""
    from types import SimpleNamespace

    from launcher.errors import UserError
    from recipes.load_checks import check_lora_targets
    from recipes.tiny import tiny_model, tiny_tokenizer

    model = tiny_model(tiny_tokenizer())
    check = lambda t: check_lora_targets(SimpleNamespace(peft=SimpleNamespace(method="lora", target_modules=t)), model)  # noqa
    for fine in (["q_proj", "v_proj"], ["self_attn.q_proj"], ["model.layers.0.self_attn.q_proj"], r".*\.q_proj"):
        check(fine)
    with pytest.raises(UserError, match="regular expression over full module names and matches none"):
        check("q_proj")


def test_report_to_a_logger_that_is_not_installed(tmp_path, capsys):
    missing = next(n for n in ("wandb", "comet_ml", "clearml", "dvclive") if importlib.util.find_spec(n) is None)
    out = tmp_path / "out"
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", f"training.report_to={missing}")
    assert_clean_failure(code, capsys.readouterr().err, out, f"training.report_to: {missing} not installed here")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_liger_kernel(tmp_path, capsys):
    out = tmp_path / "out"
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "training.use_liger_kernel=true")
    assert_clean_failure(code, capsys.readouterr().err, out, "training.use_liger_kernel: liger-kernel is not installed")


def test_existing_output_dir_is_left_alone_on_bad_input(tmp_path, capsys):
    """A bad override against an existing run directory must not delete or touch it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "training.max_steps=2",
                         f"data.source={tmp_path / 'nope.jsonl'}")
    assert code == 2 and "file not found" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_debug_shows_traceback(tmp_path, capsys):
    from launcher.errors import UserError

    with pytest.raises(UserError):
        run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={tmp_path / 'o'}", "seed=abc", "--debug")


# ---- the real command line (subprocesses) ------------------------------------------------------------------------

def test_cli_unknown_recipe(tmp_path):
    result = run_cli("--recipe", "lora_tinny", f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(result.returncode, result.stderr, tmp_path / "out", "unknown recipe 'lora_tinny'",
                         "did you mean 'lora_tiny'?")


def test_cli_bad_data_row(tmp_path):
    rows = good_rows(4)
    rows[1] = {"completion": "3"}
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = run_cli("--recipe", "lora_tiny", f"output_dir={tmp_path / 'out'}", f"data.source={data}")
    assert_clean_failure(result.returncode, result.stderr, tmp_path / "out", "rows.jsonl row 2", "'prompt'")


def test_cli_plan_impossible_inventory():
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "--recipe", "lora_tiny", "--inventory",
                             "3xfoo"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "3xfoo" in result.stderr


@pytest.mark.slow
def test_cli_two_ranks_global_batch_not_divisible(tmp_path):
    """Under the real `deepspeed --num_gpus 2` launcher: exit 2, and one line (not one per rank)."""
    out = tmp_path / "out"
    result = run_cli("--recipe", "lora_tiny", f"output_dir={out}", "plan.global_batch_size=3",
                     launcher=deepspeed_cmd(2))
    assert result.returncode == 2, result.stderr[-2000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("ftlaunch:")]
    assert len(ours) == 1 and "plan.global_batch_size=3" in ours[0], ours
    assert "Traceback" not in result.stderr and not out.exists()


def test_deepspeed_local_rank_argument_before_the_command(capsys):
    """`deepspeed ftlaunch check ...` passes --local_rank=N first (in either spelling): not an unknown command."""
    assert run_inprocess("--local_rank=0", "recipes") == 0
    assert run_inprocess("--local_rank", "1", "recipes") == 0
    assert "lora_tiny" in capsys.readouterr().out
