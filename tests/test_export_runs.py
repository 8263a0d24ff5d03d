"""After the run: `ftlaunch export --merge` writes a full HF model that computes what the adapter model computed, and
`ftlaunch runs` lists past runs with their status."""
from __future__ import annotations

import json

import pytest

from conftest import run_inprocess

FAST = ["data.num_examples=256", "eval.num_examples=8", "training.logging_steps=2", "training.save_steps=4",
        "plan.global_batch_size=16", "training.max_steps=6"]
# Max |logit difference| merged vs adapter model: the same float32 arithmetic in a different order (W + BA once vs
# Wx + B(Ax) per token). Measured below 1e-5 on the tiny model's logits (magnitude ~2).
MERGE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for recipe in ("lora_tiny", "qlora_tiny"):
        assert run_inprocess("run", "--recipe", recipe, f"output_dir={root / recipe}", *FAST) == 0
    # a LoRA reward model: a sequence-classification adapter whose one-output head the base's config does not know
    assert run_inprocess("run", "--recipe", "rm_tiny", "peft.method=lora", f"output_dir={root / 'rm_lora'}",
                         *FAST) == 0
    return root


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _adapter_model(run_dir):
    """The trained model as training saw it: adapter on the base, 4-bit for QLoRA (as the builder loads it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recipes.merge import trained_in_4bit

    base_path = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    quant = trained_in_4bit(run_dir)
    if quant is None:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    else:
        from recipes.builder import bnb_4bit_config, same_4bit_kernels

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                    quantization_config=bnb_4bit_config("nf4", True, torch.float32))
        same_4bit_kernels(base)
    return PeftModel.from_pretrained(base, run_dir)


@pytest.mark.parametrize("recipe", ["lora_tiny", "qlora_tiny"])
def test_merged_model_computes_what_the_adapter_model_did(runs, recipe, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = runs / recipe
    out = tmp_path / "merged"
    assert run_inprocess("export", str(run_dir), "--merge", "--out", str(out)) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists(), "a plain HF model, no adapter"
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 20, 21, 22, 23, 24, 25, 26]])
    expected = _logits(_adapter_model(run_dir), ids)
    diff = (_logits(merged, ids) - expected).abs().max().item()
    assert diff <= MERGE_TOLERANCE, diff
    if recipe == "qlora_tiny":
        # Merging into the original weights instead ignores the 4-bit rounding the adapter was trained against.
        original = tmp_path / "original"
        assert run_inprocess("export", str(run_dir), "--merge", "--base", "original", "--out", str(original)) == 0
        off = (_logits(AutoModelForCausalLM.from_pretrained(original), ids) - expected).abs().max().item()
        assert off > 100 * max(diff, 1e-7), (off, diff)


def test_merge_keeps_the_bases_own_dtype(runs, tmp_path, capsys):
    """A merge is saved in the dtype the base is stored in (a 16-bit 7B base stays 14 GB, not 28), unless --dtype
    says otherwise: the lora_tiny adapter on a bfloat16 copy of its base."""
    import shutil

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    shutil.copytree(runs / "lora_tiny", adapter)
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    base16 = tmp_path / "base16"
    AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"], dtype=torch.bfloat16).save_pretrained(base16)
    (adapter / "adapter_config.json").write_text(json.dumps(dict(adapter_cfg, base_model_name_or_path=str(base16))))

    def dtypes(out):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    assert run_inprocess("export", str(adapter), "--merge", "--out", str(tmp_path / "auto")) == 0
    assert "bfloat16" in capsys.readouterr().out and dtypes(tmp_path / "auto") == {"BF16"}
    assert run_inprocess("export", str(adapter), "--merge", "--dtype", "fp32", "--out", str(tmp_path / "fp32")) == 0
    assert "float32" in capsys.readouterr().out and dtypes(tmp_path / "fp32") == {"F32"}


def test_merged_reward_model_scores_what_the_adapter_did(runs, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, out = runs / "rm_lora", tmp_path / "merged"
    assert run_inprocess("export", str(run_dir), "--merge", "--out", str(out)) == 0
    assert "AutoModelForSequenceClassification.from_pretrained" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id is not None
    base_path = json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32,
                                                              pad_token_id=merged.config.pad_token_id)
    adapter = PeftModel.from_pretrained(base, run_dir).eval()
    pad = merged.config.pad_token_id
    ids = torch.tensor([[1, 20, 21, 22, 23, 24, 25, 26], [1, 30, 31, 32, pad, pad, pad, pad]])
    mask = (ids != pad).long()
    with torch.no_grad():
        got, expected = merged(input_ids=ids, attention_mask=mask).logits, adapter(input_ids=ids, attention_mask=mask).logits
    assert got.shape == (2, 1)
    assert (got - expected).abs().max().item() <= MERGE_TOLERANCE


def test_export_refuses_what_it_cannot_merge(runs, tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    assert run_inprocess("export", str(tmp_path / "unfinished"), "--merge") == 2
    assert "has not finished" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    assert run_inprocess("export", str(tmp_path / "full"), "--merge") == 2
    assert "holds a full fine-tune" in capsys.readouterr().err
    assert run_inprocess("export", str(runs / "lora_tiny")) == 2
    assert "pass --merge" in capsys.readouterr().err
    prompt = tmp_path / "prompt"
    prompt.mkdir()
    (prompt / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}))
    assert run_inprocess("export", str(prompt), "--merge") == 2
    err = capsys.readouterr().err
    assert "prompt_tuning adapter" in err and "no weights to merge" in err and err.count("\n") == 1
    assert not (prompt / "merged").exists()


def test_runs_lists_status_step_and_score(runs, capsys):
    (runs / "broken").mkdir()
    (runs / "broken" / "manifest.json").write_text("{not json")  # skipped, not a crash
    assert run_inprocess("runs", str(runs), "--json") == 0
    rows = {r["recipe"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"lora_tiny", "qlora_tiny", "rm_tiny"}
    for row in rows.values():
        assert row["status"] == "finished" and row["step"] == 6
        assert row["score"].startswith("pairwise_accuracy=" if row["recipe"] == "rm_tiny" else "exact_match="), row
    assert run_inprocess("runs", str(runs)) == 0
    assert "lora_tiny" in capsys.readouterr().out
    assert run_inprocess("runs", str(runs / "nope")) == 2  # a directory that is not there is a typo, not "no runs"
    assert "is not a directory" in capsys.readouterr().err


def test_runs_score_is_the_recipes_own_metric(tmp_path):
    from launcher.runs import find_runs

    run = tmp_path / "cls"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "recipe": "cls_tiny", "method": "classify", "status": "finished", "step": 5,
        "config": {"classify": {"metric": "f1"}}, "metrics": {"after": {"accuracy": 0.5, "f1_macro": 0.4}}}))
    assert find_runs(tmp_path)[0]["score"] == "f1_macro=0.400"
    # another tool's manifest.json, or ours in a shape it never has: skipped or shown without a score, no traceback
    for name, data in (("web", {"name": "app"}), ("list", [1, 2]), ("odd", {"recipe": "x", "method": "sft",
                                                                         "status": "finished", "metrics": [1]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(data))
    assert [(r["recipe"], r["score"]) for r in find_runs(tmp_path)] == [("cls_tiny", "f1_macro=0.400"), ("x", "-")]
