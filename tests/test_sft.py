"""Foundation: the tiny SFT/LoRA/QLoRA recipes train for real (TRL + bitsandbytes), outputs reload exactly, and the
real `deepspeed` launcher runs ZeRO-2 and ZeRO-3 across 2 CPU ranks."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, manifest, run_cli, run_inprocess

FAST = ["data.num_examples=256", "eval.num_examples=16", "training.logging_steps=2", "training.save_steps=1000",
        "plan.global_batch_size=16"]


@pytest.mark.parametrize("recipe", ["sft_tiny", "lora_tiny", "qlora_tiny"])
def test_tiny_recipe_trains_and_loss_falls(recipe, tmp_path):
    out = tmp_path / recipe
    assert run_inprocess("run", "--recipe", recipe, f"output_dir={out}", "training.max_steps=12", *FAST) == 0
    m = manifest(out)
    metrics = m["metrics"]
    assert m["status"] == "finished" and metrics["global_step"] == 12 and metrics["world_size"] == 1
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5, metrics
    assert metrics["before"]["n"] == metrics["after"]["n"] == 16  # both evaluations scored every held-out row
    assert metrics["data"]["padding_share"] < 0.25  # sums of similar length: little padding, no packing advice
    assert (out / "recipe.yaml").exists() and (out / "tokenizer.json").exists()
    weights = "adapter_model.safetensors" if recipe != "sft_tiny" else "model.safetensors"
    assert (out / weights).exists()
    if recipe == "qlora_tiny":
        adapter = json.loads((out / "adapter_config.json").read_text())
        targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
        assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert list((out).glob("**/events.out.tfevents*")), "tensorboard events are written by default"
    card = (out / "README.md").read_text()  # ours, not TRL's "fine-tuned version of [None]"
    assert f"recipe `{recipe}`" in card and f'from_pretrained("{out}"' in card and "exact_match:" in card
    if recipe == "qlora_tiny":  # the card loads the 4-bit base the adapter was trained on
        namespace = {}
        exec(card.split("```python\n")[1].split("```")[0], namespace)  # noqa: S102 (the card's own snippet)
        assert any(type(m).__name__ == "Linear4bit" for m in namespace["model"].modules())


def test_counted_rows_fit_the_plan_and_give_the_padding_share_the_trainer_pads(tmp_path, capsys):
    """Once the rows are counted, the plan is made again for the longest and the trainer follows it; the padding
    share computed from the counts is the share of padding in the trainer's own micro-batches, and a large one is
    reported at the start with the switch that removes it."""
    from launcher.config import load_recipe
    from launcher.train import DistEnv, RunContext, make_plan, plan_inputs
    from recipes import common, sft

    rng = random.Random(0)
    rows = [{"prompt": f"{i}+1=", "completion": " ".join(["one"] * (1 if rng.random() < 0.8 else 20))}
            for i in range(400)]
    data = tmp_path / "skewed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_recipe("lora_tiny", overrides=[f"output_dir={tmp_path / 'out'}", f"data.source={data}",
                                              "plan.micro_batch_size=16", "plan.global_batch_size=16"])
    inputs = plan_inputs(cfg, DistEnv())
    ctx = RunContext(cfg=cfg, plan=make_plan(cfg, DistEnv(), inputs), env=DistEnv(), ds_config=None,
                     output_dir=tmp_path, planned_from=inputs)
    trainer, _ = sft.build(ctx)
    longest = ctx.stats["longest"]
    assert longest < cfg.data.max_length and ctx.plan.seq_len == longest
    assert trainer.args.per_device_train_batch_size == ctx.plan.micro_batch_size == 16
    masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]
    measured = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert max(m.shape[1] for m in masks) == longest
    share = ctx.stats["padding_share"]
    assert share > 0.25 and abs(share - measured) < 0.05, (share, measured)  # another shuffle, same expectation
    common.print_start(ctx, trainer, None)
    assert f"~{share:.0%} of the token slots in a micro-batch of 16 are padding; data.packing=true" in \
        capsys.readouterr().out


def _trained_in_memory(recipe: str, out: Path):
    """Build and train through the recipe module directly, to compare the in-memory model with what was saved."""
    from launcher.config import load_recipe
    from launcher.train import DistEnv, RunContext, make_plan
    from recipes import sft

    cfg = load_recipe(recipe, overrides=[f"output_dir={out}", "training.max_steps=6", *FAST])
    ctx = RunContext(cfg=cfg, plan=make_plan(cfg, DistEnv()), env=DistEnv(), ds_config=None, output_dir=out)
    trainer, _ = sft.build(ctx)
    trainer.train()
    trainer.save_model(str(out))
    return trainer, cfg, ctx.plan


@pytest.mark.parametrize("recipe", ["lora_tiny", "qlora_tiny"])
def test_saved_adapter_reloads_with_identical_logits(recipe, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recipes.builder import quantization_config, same_4bit_kernels

    out = tmp_path / "out"
    trainer, cfg, plan = _trained_in_memory(recipe, out)
    # accelerate wraps forward (autocast, fp32 conversion); unwrap it to see the trained weights alone
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    ids = torch.tensor([[1, 20, 21, 22, 23, 24, 25, 26]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                quantization_config=quantization_config(cfg, plan))
    same_4bit_kernels(base)  # as the builder does (see recipes/builder.py)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    if recipe == "lora_tiny":
        assert torch.equal(got, expected), "LoRA reloads bit-identically"
        return
    # QLoRA: TRL's SFTTrainer casts a quantised model's adapter weights to bfloat16, so training ran the LoRA
    # branch in bf16 and the float32 reload differs slightly (measured 7e-4 on logits of magnitude ~2). Cast the
    # reloaded adapter as TRL did and the logits must be identical: the 4-bit base reloads bit-identically.
    assert (got - expected).abs().max().item() <= 2e-3
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,stage", [("lora_tiny", 2), ("sft_tiny", 3)])
def test_two_rank_deepspeed_zero(recipe, stage, tmp_path):
    """The real `deepspeed --num_gpus 2` launcher: 2 CPU ranks with gloo, ZeRO-2 and ZeRO-3 through HF/TRL."""
    out = tmp_path / "out"
    ds_dir = tmp_path / "ds_configs"
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    result = run_cli("--recipe", recipe, f"output_dir={out}", f"plan.zero_stage={stage}", "training.max_steps=4",
                     *FAST, launcher=deepspeed_cmd(2), env={"FTLAUNCH_DS_CONFIG_DIR": str(ds_dir)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    left = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before
    assert not left, f"DeepSpeed's CPU all-reduce segments left in /dev/shm (RAM): {sorted(p.name for p in left)}"
    m = manifest(out)
    assert m["status"] == "finished" and m["metrics"]["world_size"] == 2, "both ranks must be in one trainer"
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert json.loads(next(ds_dir.glob("*.json")).read_text()) == ds, "rank 0 also writes ds_configs/"
    assert ds["train_batch_size"] == 16 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    weights = "model.safetensors" if recipe == "sft_tiny" else "adapter_model.safetensors"
    assert (out / weights).exists(), "ZeRO-3 gathers 16-bit weights on save: a loadable HF model"
    assert result.stdout.count("ftlaunch summary") == 1, "only rank 0 reports"


def test_load_dtype_of_a_one_process_full_finetune():
    """fp16 weights cannot train without DeepSpeed (HF's grad scaler refuses fp16 gradients): load those in fp32,
    as the planner predicts; bf16 trains as loaded; adapters, quantised bases and DeepSpeed runs keep 16-bit."""
    import types

    import torch

    from recipes.builder import torch_dtype

    cfg = types.SimpleNamespace(model=types.SimpleNamespace(dtype="auto"))
    fp16 = types.SimpleNamespace(precision="fp16", single_process=True)
    assert torch_dtype(cfg, fp16, trained_full=True) == torch.float32
    assert torch_dtype(cfg, fp16) == torch.float16  # frozen bases, evaluation loads
    bf16 = types.SimpleNamespace(precision="bf16", single_process=True)
    assert torch_dtype(cfg, bf16, trained_full=True) == torch.bfloat16
    engine = types.SimpleNamespace(precision="fp16", single_process=False)
    assert torch_dtype(cfg, engine, trained_full=True) == torch.float16  # DeepSpeed keeps fp32 masters itself


def test_chat_data_needs_a_template_and_model_chat_template_gives_one(tmp_path, capsys):
    """A base model's tokenizer (Llama-2-7b-hf, Mistral-7B-v0.1) has no chat template: chat rows then fail inside
    transformers; ftlaunch names model.chat_template and the fix instead, exit 2, nothing written. With it set (a
    tokenizer to take the template from, or a .jinja file), the run trains and saves the template with its tokenizer."""
    from transformers import AutoTokenizer

    from recipes import builder

    tokenizer = AutoTokenizer.from_pretrained(builder.tiny_model_dir(None, seed=0))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "base_tokenizer")
    rows = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(32)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = run_inprocess("run", "--recipe", "sft_tiny", f"output_dir={out}", f"data.source={tmp_path / 'chat.jsonl'}",
                       f"model.tokenizer={tmp_path / 'base_tokenizer'}", "training.max_steps=1")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlaunch")]
    assert rc == 2 and len(err) == 1 and "model.chat_template: the data is chat" in err[0], err
    assert not out.exists()
    # model.chat_template fills the gap: another tokenizer's template, or a .jinja file
    template = AutoTokenizer.from_pretrained(builder.tiny_model_dir(None, seed=0)).chat_template
    (tmp_path / "chat.jinja").write_text(template)
    for source in (builder.tiny_model_dir(None, seed=0), tmp_path / "chat.jinja"):
        rc = run_inprocess("run", "--recipe", "sft_tiny", f"output_dir={out}", f"data.source={tmp_path / 'chat.jsonl'}",
                           f"model.tokenizer={tmp_path / 'base_tokenizer'}", f"model.chat_template={source}",
                           "training.max_steps=1", "eval.num_examples=0", "--resume", "never")
        assert rc == 0 and AutoTokenizer.from_pretrained(out).chat_template == template
        shutil.rmtree(out)


def test_chat_rows_train_on_the_assistant_turns(tmp_path):
    """A chat template that marks assistant turns ({% generation %}, the tiny one does) trains on them only: in a
    collated batch the labels are the assistant's answer and its eos, never the system or user text. A template
    without marks trains on every turn and the start says so."""
    from transformers import AutoTokenizer

    from launcher.config import load_recipe
    from launcher.train import DistEnv, RunContext, make_plan
    from recipes import builder, sft

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+1?"},
                          {"role": "assistant", "content": f"it is {i + 1}"}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    unmarked = AutoTokenizer.from_pretrained(builder.tiny_model_dir(None, seed=0))
    unmarked.chat_template = unmarked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    unmarked.save_pretrained(tmp_path / "unmarked")

    def build(*extra):
        cfg = load_recipe("lora_tiny", overrides=[f"output_dir={tmp_path / 'out'}", f"data.source={tmp_path}/chat.jsonl",
                                                  "eval.num_examples=0", *extra])
        ctx = RunContext(cfg=cfg, plan=make_plan(cfg, DistEnv()), env=DistEnv(), ds_config=None, output_dir=tmp_path)
        return ctx, sft.build(ctx)[0]

    ctx, trainer = build()
    assert trainer.args.assistant_only_loss and not ctx.start_notes
    tokenizer = trainer.processing_class
    for row in (trainer.train_dataset[i] for i in range(3)):
        labels = trainer.data_collator([row])["labels"][0]
        trained = tokenizer.decode([t for t in labels.tolist() if t != -100])
        assert trained.startswith("it is ") and trained.endswith(tokenizer.eos_token), trained
        assert "Be brief" not in trained and "?" not in trained
    ctx, trainer = build(f"model.tokenizer={tmp_path / 'unmarked'}")
    assert not trainer.args.assistant_only_loss and "the loss covers every turn" in ctx.start_notes[0]
