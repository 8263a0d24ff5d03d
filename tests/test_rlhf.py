"""RLHF and other training recipes: rm, dpo, grpo, ppo, classify (tiny models on CPU).

Single-process recipes run in this process (`launcher.cli.main`, ~10 s of imports saved per run); the CLI error
paths and the 2-rank DeepSpeed PPO run go through real subprocesses.

The shipped tiny recipes train on `synthetic:arith`, where a *random* tiny model needs minutes (an SFT stage first,
as `ftlaunch pipeline rlhf_tiny` does) before preferences over sums carry a signal. To see "the loss falls / the
reward rises" within seconds, these tests feed the same recipes an easy preference set written here: the chosen
answer is the correct sum, the rejected one a word. A trainer that does not learn (wrong labels, frozen weights,
broken loss) fails these checks; the RLHF pipeline test and the measured rlhf_tiny run cover the arithmetic itself.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, manifest, run_cli, run_inprocess

WORDS = ["no", "yes", "cat", "dog", "red", "the", "is", "a"]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def easy_preferences(n: int = 240, seed: int = 0) -> list[dict]:
    from recipes import synthetic

    rng = random.Random(seed)
    return [{"prompt": e["prompt"], "chosen": e["answer"], "rejected": rng.choice(WORDS)}
            for e in synthetic.make_examples("arith", n, seed=seed)]


def easy_classification(n: int = 240, seed: int = 0) -> list[dict]:
    """Label 1: a sum with its number; label 0: a sum followed by a word. Imbalanced 3:1 on purpose."""
    from recipes import synthetic

    rng = random.Random(seed)
    rows = []
    for i, e in enumerate(synthetic.make_examples("arith", n, seed=seed)):
        positive = i % 4 != 0
        rows.append({"text": e["prompt"] + (e["answer"] if positive else rng.choice(WORDS)), "label": int(positive)})
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rlhf-data")
    _write_jsonl(d / "prefs.jsonl", easy_preferences())
    _write_jsonl(d / "cls.jsonl", easy_classification())
    _write_jsonl(d / "no_rejected.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]}
                                           for r in easy_preferences(20)])
    return d


def _losses(m: dict) -> tuple[float, float]:
    metrics = m["metrics"]
    return metrics["train_loss_first"], metrics["train_loss_last"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, data_dir) -> Path:
    """A reward model trained once (rm_tiny on the easy pairs): prefers a number to a word."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    rc = run_inprocess("run", "--recipe", "rm_tiny", f"output_dir={out}", f"data.source={data_dir / 'prefs.jsonl'}",
                       "data.eval_ratio=0.2", "plan.global_batch_size=16", "training.max_steps=24",
                       "training.learning_rate=3e-3", "training.logging_steps=4", "training.warmup_steps=0",
                       "eval.num_examples=48")
    assert rc == 0
    return out


# ---- reward model ---------------------------------------------------------------------------------------------------

def test_rm_tiny_learns_pairwise_preferences(rm_dir):
    m = manifest(rm_dir)
    assert m["status"] == "finished" and m["method"] == "rm"
    first, last = _losses(m)
    assert last < first - 0.1, (first, last)
    before, after = m["metrics"]["before"], m["metrics"]["after"]
    assert after["pairwise_accuracy"] >= 0.9 and after["pairwise_accuracy"] > before["pairwise_accuracy"]
    assert (rm_dir / "config.json").is_file()
    config = json.loads((rm_dir / "config.json").read_text())
    assert len(config["id2label"]) == 1  # one output: the reward
    assert config["pad_token_id"] is not None


# ---- DPO --------------------------------------------------------------------------------------------------------

def test_dpo_tiny_lora_loss_falls(tmp_path, data_dir):
    out = tmp_path / "dpo"
    rc = run_inprocess("run", "--recipe", "dpo_tiny", f"output_dir={out}", f"data.source={data_dir / 'prefs.jsonl'}",
                       "plan.global_batch_size=16", "training.max_steps=16", "training.logging_steps=4",
                       "training.warmup_steps=0", "eval.num_examples=8")
    assert rc == 0
    m = manifest(out)
    first, last = _losses(m)
    assert first == pytest.approx(0.6931, abs=0.01)  # DPO starts at log 2: policy == reference
    assert last < first - 0.05, (first, last)
    assert (out / "adapter_config.json").is_file()  # LoRA: the reference was the adapter-disabled policy


# ---- GRPO -------------------------------------------------------------------------------------------------------

def test_grpo_tiny_reward_model_reward_rises(tmp_path, rm_dir):
    out = tmp_path / "grpo"
    rc = run_inprocess("run", "--recipe", "grpo_tiny", f"output_dir={out}", f"grpo.reward=[arith, {rm_dir}]",
                       "grpo.reward_weights=[0.0, 1.0]", "training.max_steps=12", "training.learning_rate=5e-3",
                       "eval.num_examples=32")
    assert rc == 0
    m = manifest(out)
    before, after = m["metrics"]["before"], m["metrics"]["after"]
    key = f"reward/{rm_dir.name}"
    assert after[key] > before[key] + 0.1, (before[key], after[key])
    assert "reward/arith" in after and "accuracy" in after


def test_grpo_prompts_are_cut_to_the_planned_length():
    """TRL's GRPOTrainer keeps whole prompts; the plan sized them at data.max_length: the recipe keeps their end."""
    from datasets import Dataset

    from launcher.errors import UserError
    from recipes.grpo import cut_prompts
    from recipes.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    rows = Dataset.from_list([{"prompt": "1234567890" * 5, "answer": "1"}, {"prompt": "12+3=", "answer": "15"}])
    out = cut_prompts(rows, tokenizer, 16).to_list()
    assert [len(tokenizer(r["prompt"])["input_ids"]) for r in out] == [16, 6]
    assert out[0]["prompt"] == ("1234567890" * 5)[-15:] and out[1] == {"prompt": "12+3=", "answer": "15"}
    short_chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "1"}]}])
    assert cut_prompts(short_chat, tokenizer, 64).to_list() == short_chat.to_list()
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": "1" * 40}]}])
    with pytest.raises(UserError, match="data.max_length"):
        cut_prompts(chat, tokenizer, 16)


def test_grpo_reward_names_are_a_registry_not_code():
    from launcher.errors import UserError
    from recipes import rewards

    assert rewards.reward_function("arith") is rewards.REWARDS["arith"]
    with pytest.raises(UserError, match="grpo.reward: unknown reward 'arth'.*did you mean 'arith'"):
        rewards.reward_function("arth")
    with pytest.raises(UserError, match="unknown reward"):
        rewards.resolve("__import__('os').system('true')", tokenizer=None)
    assert rewards.REWARDS["exact"](["2+3="], ["5"]) == [1.0]
    assert rewards.REWARDS["arith"](["2+3="], ["6"]) == [0.1]


# ---- PPO --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A starting policy that answers sums with a number half the time and with a word otherwise (40 SFT steps), so
    PPO has something to choose between: the reward model prefers the numbers (and rollouts that stop)."""
    from recipes import synthetic

    d = tmp_path_factory.mktemp("policy")
    rng = random.Random(1)
    rows = [{"prompt": e["prompt"], "completion": e["answer"] if i % 2 else rng.choice(WORDS)}
            for i, e in enumerate(synthetic.make_examples("arith", 400, seed=1))]
    data = _write_jsonl(d / "mixed.jsonl", rows)
    rc = run_inprocess("run", "--recipe", "sft_tiny", f"output_dir={d / 'sft'}", f"data.source={data}",
                       "plan.global_batch_size=16", "training.max_steps=40", "training.warmup_steps=0",
                       "training.learning_rate=3e-3", "eval.num_examples=8")
    assert rc == 0
    return d / "sft"


def test_rm_qlora_trains_on_an_fp32_plan(tmp_path):
    """A 4-bit reward model with LoRA on the CPU (an fp32 plan, no autocast): TRL casts the trained score head to
    bf16, and the fp32 hidden states met it ("expected m1 and m2 to have the same dtype") before the recipe cast it
    back."""
    out = tmp_path / "rm_qlora"
    assert run_inprocess("run", "--recipe", "rm_tiny", f"output_dir={out}", "peft.method=lora",
                         "quant.load_in_4bit=true", "training.max_steps=2", "eval.num_examples=8") == 0
    m = manifest(out)
    assert m["status"] == "finished" and m["metrics"]["after"]["n"] == 8


def test_rm_drops_over_long_pairs_and_says_so(tmp_path, capsys):
    """TRL's RewardTrainer drops a pair over max_length (it cannot truncate one): with data.too_long=truncate (the
    default) the summary counted them as truncated and the trainer quietly trained on fewer rows."""
    out = tmp_path / "rm_short"
    assert run_inprocess("run", "--recipe", "rm_tiny", f"output_dir={out}", "data.max_length=9",
                         "training.max_steps=1", "eval.num_examples=4") == 0
    data = manifest(out)["metrics"]["data"]
    assert data["truncated"] == 0 and data["dropped"]["too_long"] > 0 and data["longest"] <= 9
    assert data["train_rows"] + data["eval_rows"] + data["dropped"]["too_long"] == data["rows_read"], data
    text = capsys.readouterr().out
    assert "dropped: the reward trainer cannot truncate a pair" in text and "too long" in text


def test_ppo_tiny_reward_rises(tmp_path, rm_dir, policy_dir):
    import signal

    out = tmp_path / "ppo"
    handler = signal.getsignal(signal.SIGTERM)
    rc = run_inprocess("run", "--recipe", "ppo_tiny", f"output_dir={out}", f"model.name={policy_dir}",
                       f"ppo.reward_model={rm_dir}", "training.max_steps=8", "eval.num_examples=16")
    assert rc == 0
    m = manifest(out)
    metrics = m["metrics"]
    after = metrics["after"]
    assert metrics["world_size"] == 1 and metrics["global_step"] == 8
    assert len(after["curve"]) == 8 and after["kl"] is not None
    # PPO's own objective: the reward model's score of the rollouts (minus the missing-eos penalty) goes up
    assert after["train_score_last"] > after["train_score_first"] + 0.3, after["curve"]
    assert {"score", "accuracy", "reward/arith"} <= set(metrics["before"]) and "score" in after
    assert (out / "adapter_config.json").is_file()  # LoRA policy saved as an adapter
    # the loop ended as TRL ends it: the callbacks saw the train end (the preemption handlers are gone again)
    assert signal.getsignal(signal.SIGTERM) == handler


def test_ppo_preempted_keeps_the_policy_so_far_and_does_not_ask_for_a_requeue(tmp_path, rm_dir, monkeypatch,
                                                                              capsys):
    """TRL's PPO loop ignores `should_training_stop` and PPO cannot resume: a preemption warning at step 2 leaves
    the loop there, saves the policy so far as the run's result (status stopped, exit 0: a requeue would only start
    again from scratch), and says so."""
    from launcher.preempt import PreemptionCallback

    step_end = PreemptionCallback.on_step_end

    def warned_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.request()  # as the SIGUSR1 handler does
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(PreemptionCallback, "on_step_end", warned_at_step_2)
    out = tmp_path / "ppo"
    rc = run_inprocess("run", "--recipe", "ppo_tiny", f"output_dir={out}", f"ppo.reward_model={rm_dir}",
                       "training.max_steps=6", "eval.num_examples=4")
    assert rc == 0
    m = manifest(out)
    assert m["status"] == "stopped" and m["step"] == 2 and "cannot resume" in m["error"]
    assert m["metrics"].get("after") is None and (out / "adapter_config.json").is_file()
    assert "stopped at step 2 of 6 by a preemption warning" in capsys.readouterr().out


def test_ppo_takes_chat_prompts_through_the_chat_template(tmp_path, rm_dir):
    """Chat prompts (trl-lib/ultrafeedback-prompt's layout) become the chat template's text with the generation
    prompt, tokenised with one BOS, not two."""
    from launcher.config import load_recipe
    from launcher.train import DistEnv, RunContext, make_plan
    from recipes import ppo

    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(40)]
    data = _write_jsonl(tmp_path / "chat_prompts.jsonl", rows)
    cfg = load_recipe("ppo_tiny", overrides=[f"output_dir={tmp_path / 'o'}", f"ppo.reward_model={rm_dir}",
                                             f"data.source={data}", "eval.num_examples=4"])
    env = DistEnv()
    ctx = RunContext(cfg=cfg, plan=make_plan(cfg, env), env=env, ds_config=None, output_dir=tmp_path / "o")
    trainer, evaluator = ppo.build(ctx)
    tokenizer = trainer.processing_class
    expected = {tuple(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)["input_ids"])
                for r in rows}
    got = {tuple(r["input_ids"]) for r in trainer.train_dataset}
    assert len(got) >= 30 and got <= expected, (sorted(got)[:1], sorted(expected)[:1])
    assert all(ids[0] == tokenizer.bos_token_id != ids[1] for ids in got)
    assert evaluator is not None


def test_adapter_dirs_are_merged_for_ppo(tmp_path):
    """PPO's policy (any recipe's model.name) may start from an SFT stage's LoRA output: merged into its base once,
    cached."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from launcher.config import load_recipe
    from recipes import builder

    base = builder.tiny_model_dir(None, seed=0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a non-trivial adapter
    model.save_pretrained(tmp_path / "adapter")
    cfg = load_recipe("ppo_tiny", overrides=[f"model.name={tmp_path / 'adapter'}", "ppo.reward_model=x"])
    merged = Path(builder.model_path(cfg))
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert builder.model_path(cfg) == str(merged)  # cached
    ids = torch.tensor([[1, 40, 41, 42]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(ids).logits,
                                   reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_ppo_lora_uses_adapter_disabled_reference(tmp_path, rm_dir):
    """Four models, three copies: with LoRA the reference is the policy with its adapter disabled."""
    from launcher.config import load_recipe
    from launcher.train import DistEnv, RunContext, make_plan
    from recipes import ppo

    cfg = load_recipe("ppo_tiny", overrides=[f"output_dir={tmp_path / 'o'}", f"ppo.reward_model={rm_dir}"])
    env = DistEnv()
    ctx = RunContext(cfg=cfg, plan=make_plan(cfg, env), env=env, ds_config=None, output_dir=tmp_path / "o")
    trainer, evaluator = ppo.build(ctx)
    assert trainer.ref_model is None and trainer.is_peft_model
    assert trainer.reward_model is not trainer.value_model
    assert evaluator is not None and ctx.stats["value_model"] == ctx.stats["reward_model"]


def test_ppo_applies_planned_gradient_checkpointing(tmp_path, rm_dir):
    """TRL's PPO loop never enables checkpointing itself: the recipe does, on the policy and the value model, and
    an update still trains both (the planner charges checkpointed activations for this plan)."""
    from launcher.config import load_recipe
    from launcher.train import DistEnv, RunContext, make_plan
    from recipes import ppo

    cfg = load_recipe("ppo_tiny", overrides=[f"output_dir={tmp_path / 'o'}", f"ppo.reward_model={rm_dir}",
                                             "plan.gradient_checkpointing=true", "training.max_steps=1",
                                             "ppo.num_ppo_epochs=1", "training.report_to=[]"])
    env = DistEnv()
    ctx = RunContext(cfg=cfg, plan=make_plan(cfg, env), env=env, ds_config=None, output_dir=tmp_path / "o")
    assert ctx.plan.gradient_checkpointing
    trainer, _ = ppo.build(ctx)
    assert trainer.policy_model.is_gradient_checkpointing and trainer.value_model.is_gradient_checkpointing
    import torch

    trained = {name: [p for p in m.parameters() if p.requires_grad]
               for name, m in (("policy", trainer.policy_model), ("value", trainer.value_model))}
    before = {name: [p.detach().clone() for p in params] for name, params in trained.items()}
    trainer.train()
    assert trainer.state.global_step == 1
    for name, params in trained.items():
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before[name], params)), name


def test_ppo_tiny_deepspeed_zero2_two_ranks(tmp_path, rm_dir):
    out = tmp_path / "ppo-ds"
    proc = run_cli("--recipe", "ppo_tiny", f"output_dir={out}", f"ppo.reward_model={rm_dir}", "plan.zero_stage=2",
                   "training.max_steps=2", "eval.num_examples=8", launcher=deepspeed_cmd(2),
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = manifest(out)
    assert m["status"] == "finished"
    assert m["metrics"]["world_size"] == 2  # the trainer saw both ranks (CPU-FACTS: use_cpu + deepspeed)
    assert m["metrics"]["global_step"] == 2
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


# ---- classification -------------------------------------------------------------------------------------------

def test_cls_tiny_trains_with_early_stopping_and_class_weights(tmp_path, data_dir):
    out = tmp_path / "cls"
    rc = run_inprocess("run", "--recipe", "cls_tiny", f"output_dir={out}", f"data.source={data_dir / 'cls.jsonl'}",
                       "data.eval_ratio=0.2", "plan.global_batch_size=16", "training.max_steps=30",
                       "training.learning_rate=3e-3", "training.logging_steps=5", "training.warmup_steps=0",
                       "classify.eval_steps=10", "training.save_steps=10", "classify.class_weights=auto")
    assert rc == 0
    m = manifest(out)
    first, last = _losses(m)
    assert last < first, (first, last)
    after = m["metrics"]["after"]
    assert after["accuracy"] >= 0.9 and after["f1_macro"] >= 0.85
    assert "eval_f1_macro" in m["metrics"]["eval"]
    assert m["metrics"]["data"]["class_weights"]  # auto: inverse frequency of the 3:1 labels
    states = sorted(out.glob("checkpoint-*/trainer_state.json"))
    state = json.loads(states[-1].read_text())
    assert state["best_model_checkpoint"] and state["best_metric"] is not None  # load_best_model_at_end


def test_class_weights_freeze_and_f1_units():
    import numpy as np
    import torch

    from launcher.errors import UserError
    from recipes import classify
    from recipes.tiny import tiny_model_config, tiny_tokenizer

    assert classify.class_weights("none", {0: 1, 1: 3}, 2) is None
    assert classify.class_weights("auto", {0: 10, 1: 30}, 2) == pytest.approx([2.0, 2 / 3])
    assert classify.class_weights([1, 5], {}, 2) == [1.0, 5.0]
    with pytest.raises(UserError, match="classify.class_weights"):
        classify.class_weights([1], {}, 2)
    assert classify.macro_f1(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == pytest.approx((2 / 3 + 0.8) / 2)

    from transformers import LlamaForSequenceClassification

    tok = tiny_tokenizer()
    model = LlamaForSequenceClassification(tiny_model_config(tok, num_labels=2))
    assert classify.freeze_layers(model, 1) == 1
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    assert not model.get_input_embeddings().weight.requires_grad and model.score.weight.requires_grad
    with pytest.raises(UserError, match="freeze_layers"):
        classify.freeze_layers(model, 3)
    loss = classify.weighted_loss([1.0, 3.0])({"logits": torch.zeros(2, 2)}, torch.tensor([0, 1]), 2)
    assert loss.item() == pytest.approx(4 * 0.6931 / 2, abs=1e-3)


# ---- bad input through the real CLI: one line, exit 2 ------------------------------------------------------------

def test_preference_data_missing_rejected_exit_2(tmp_path, data_dir):
    proc = run_cli("--recipe", "rm_tiny", f"output_dir={tmp_path / 'o'}",
                   f"data.source={data_dir / 'no_rejected.jsonl'}", "training.max_steps=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("ftlaunch: error")]
    assert len(lines) == 1 and "rejected" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_ppo_missing_reward_model_exit_2(tmp_path):
    missing = tmp_path / "no-such-rm"
    proc = run_cli("--recipe", "ppo_tiny", f"output_dir={tmp_path / 'o'}", f"ppo.reward_model={missing}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("ftlaunch: error")]
    assert len(lines) == 1 and "ppo.reward_model" in lines[0] and str(missing) in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_two_part_run_paths_are_not_hub_ids():
    """`runs/rm_tiny` (the recipes' own default, before rm_tiny has run) or `tests/x` (an existing folder) name
    local directories; looking them up on the hub cost a minute of retries offline and the wrong advice."""
    from recipes.rewards import is_hub_id

    assert not is_hub_id("runs/rm_tiny") and not is_hub_id("tests/not-there")
    assert is_hub_id("OpenAssistant/reward-model-deberta-v3-large")


def test_load_report_of_a_fresh_head_alone_is_quiet():
    """Inside new_head_expected() (loads that add a head on purpose) transformers' LOAD REPORT for that head alone
    is dropped; a report that names anything else still reaches the user, and outside it every report does (a PPO
    reward model with an untrained head must be seen)."""
    import logging

    from transformers.utils import logging as hf_logging

    from recipes.load_checks import new_head_expected

    logger = hf_logging.get_logger("transformers.modeling_utils")
    report = ("LlamaForSequenceClassification LOAD REPORT from: /x\nKey          | Status  | \n"
              "-------------+---------+-\n{rows}\nNotes:\n- MISSING:\tnewly initialized")
    record = lambda rows: logging.LogRecord("t", logging.WARNING, "f", 1, report.format(rows=rows), None, None)  # noqa
    head_only = record("score.weight | MISSING | ")
    with new_head_expected():
        assert not all(f(head_only) for f in logger.filters)
        assert all(f(record("score.weight | MISSING | \nmodel.layers.0.mlp.up_proj.weight | MISSING | "))
                   for f in logger.filters)
        assert all(f(record("classifier.bias | UNEXPECTED | ")) for f in logger.filters)
    assert all(f(head_only) for f in logger.filters)
