"""Smoke tests of the benchmark scripts (bench/). Benchmarks print figures; these only check that they run.

Fast tests (seconds): the pure parts — configuration lists, the FLOPs formula, random-model configs matching the
cards, the synthetic data's token counts. Slow tests (`-m slow`, minutes on a 2-core CPU): each script's `--tiny`
mode end to end in a subprocess, the same way a user runs it.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["overhead", "qlora_7b", "memory_accuracy", "plan_sweep"]


@pytest.mark.parametrize("name", SCRIPTS + ["common"])
def test_bench_modules_import(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__


def test_memory_accuracy_configurations_span_methods_lengths_and_sizes():
    from bench.memory_accuracy import GPU_CONFIGS, RECIPES, TINY_CONFIGS, shape_of
    from launcher.inventory import parse_spec
    from launcher.planner import PlanRequest, estimate

    assert len(GPU_CONFIGS) >= 12 and len(TINY_CONFIGS) >= 12
    cards = {c[0] for c in GPU_CONFIGS}
    assert {"qwen2.5-0.5b", "llama-2-7b"} <= cards
    assert {c[1] for c in GPU_CONFIGS} == set(RECIPES)
    assert {c[4] for c in GPU_CONFIGS} == {True, False}
    assert len({c[2] for c in GPU_CONFIGS}) >= 3 and len({c[3] for c in GPU_CONFIGS}) >= 3
    h100 = parse_spec("1xH100-80GB")
    for card, method, seq, micro, ckpt in GPU_CONFIGS:  # every configuration is one the planner says fits an H100
        shape = shape_of(card)
        request = PlanRequest(shape=shape, method=method, seq_len=seq, global_batch_size=micro,
                              lora_r=64 if method == "qlora" else 16,
                              optimizer="paged_adamw_8bit" if method == "qlora" else "adamw_torch")
        assert estimate(request, h100, shape, zero_stage=0, offload="none", gradient_checkpointing=ckpt,
                        micro_batch_size=micro)["fits"], (card, method, seq, micro, ckpt)


@pytest.mark.parametrize("card", ["llama-2-7b", "qwen2.5-0.5b"])
def test_random_model_config_has_the_cards_parameter_count(card):
    import torch
    from transformers import AutoModelForCausalLM

    from bench.common import hf_config
    from launcher.shapes import from_hf_config, resolve_shape

    shape = resolve_shape(card)
    config = hf_config(shape)
    assert from_hf_config(config.to_dict()).num_params == shape.num_params
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == shape.num_params


def test_flops_formula_for_llama_2_7b():
    from bench.qlora_7b import flops_per_token, shape_for

    shape = shape_for(tiny=False)
    assert 6.7e9 < shape.num_params < 6.8e9
    # from Llama-2-7B's published config, not from the shape object: 32 layers of q,k,v,o (4096²) and gate, up,
    # down (4096 x 11008), lm_head 32000 x 4096; attention 12·L·s·d at s = 2048
    matmul = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 32000 * 4096
    assert flops_per_token(shape, 2048) == 4 * matmul + 12 * 32 * 2048 * 4096 == 29_649_534_976


def test_digit_rows_are_longer_than_seq(tmp_path):
    from bench.common import digit_text_file
    from recipes.tiny import tiny_tokenizer

    path = digit_text_file(tmp_path / "d.jsonl", 3, 100)
    tokenizer = tiny_tokenizer()
    for line in path.read_text().splitlines():
        assert len(tokenizer(json.loads(line)["text"])["input_ids"]) > 100


def test_sweep_micro_batches_and_table(capsys):
    from bench.common import print_table
    from bench.plan_sweep import micro_batches

    assert micro_batches(16) == [1, 2, 4, 8, 16]
    print_table([{"a": 1, "b": 0.5}], [("a", "a"), ("b", "b")])
    assert "0.5" in capsys.readouterr().out


def _run(args: list, timeout: int = 1500, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["bench/overhead.py", "--tiny", "--steps", "3"],
    ["bench/qlora_7b.py", "--tiny", "--steps", "2", "--warmup", "1"],
    ["bench/memory_accuracy.py", "--tiny", "--only", "0,5", "--steps", "2"],
    ["bench/plan_sweep.py", "--tiny", "--micro", "8", "--steps", "2"],
], ids=SCRIPTS)
def test_tiny_mode_runs(args, tmp_path):
    scratch = tmp_path / "tmp"  # the script's and its workers' temporary files: none may outlive the run
    scratch.mkdir()
    proc = _run(args + ([] if "overhead" in args[0] else ["--json", str(tmp_path / "rows.json")]), TMPDIR=str(scratch))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "FIGURE" in out
    assert not [p.name for p in scratch.iterdir() if p.name.startswith(("bench-", "tmp"))], list(scratch.iterdir())
    if "overhead" not in args[0]:
        rows = json.loads((tmp_path / "rows.json").read_text())
        assert rows and not any(r.get("error") for r in rows), rows


def test_live_tensor_meter_counts_storages_once_and_frees_them():
    """The CPU meter behind memory_accuracy --cpu: pre-existing tensors count, views are free, freed storages leave."""
    import torch

    from bench.tensor_meter import LiveTensorMeter

    mib = 1024 * 1024
    kept = torch.zeros(mib // 4)  # 1 MiB, alive before the meter starts
    with LiveTensorMeter() as meter:
        start = meter.current
        a = torch.ones(2 * mib // 4)  # +2 MiB
        view = a.view(-1, 2)[:, 0]  # a view: same storage
        b = a * 2  # +2 MiB
        del b  # -2 MiB
        after_free = meter.current
        del a, view
        end = meter.current
    assert meter.start >= mib and start == meter.start
    assert after_free - start == 2 * mib and end == start
    assert meter.peak - start == 4 * mib
    del kept


def test_gpu_session_keeps_to_its_budget_and_names_what_it_skipped(tmp_path):
    """bench/gpu_session.sh is the one command a lent GPU runs: a step that would start with less than
    MIN_STEP_S left is skipped and listed (so the next session knows what is missing), an unknown step fails."""
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, MIN_STEP_S="60")
    env.pop("TINY", None)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "5"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # nothing failed, but not everything ran
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("qlora_24gb", "qlora_speed", "mem_7b_qlora", "mem_small", "mem_7b_lora", "sweep_7b", "sweep"):
        assert f"{step}: skipped" in summary
    bad = subprocess.run(["bash", "bench/gpu_session.sh", "5"], cwd=REPO, env=dict(env, STEPS="qlora_24gb nope"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown step 'nope'" in bad.stdout
