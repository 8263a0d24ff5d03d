"""`ftlaunch pipeline`: chained recipes (rlhf_tiny: SFT -> reward model -> PPO), each stage its own process, finished
stages skipped on a re-run."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, manifest, run_inprocess

from launcher.errors import UserError

FAST = ["training.max_steps=3", "data.num_examples=200", "eval.num_examples=8", "plan.global_batch_size=8"]


def _pipeline_cli(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "launcher.cli", "pipeline", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_rlhf_tiny_pipeline_end_to_end_then_skips_finished_stages(tmp_path):
    root = tmp_path / "rlhf"
    proc = _pipeline_cli("rlhf_tiny", "--output-dir", str(root), *FAST)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for stage in ("sft", "rm", "ppo"):
        m = manifest(root / stage)
        assert m["status"] == "finished", stage
        assert m["metrics"]["global_step"] == 3, stage
    assert manifest(root / "sft")["method"] == "sft"
    assert manifest(root / "rm")["method"] == "rm"
    ppo = manifest(root / "ppo")
    assert ppo["method"] == "ppo"
    # each stage consumed the previous stage's output
    recipe = (root / "ppo" / "recipe.yaml").read_text()
    assert f"name: {root / 'sft'}" in recipe and f"reward_model: {root / 'rm'}" in recipe
    assert f"name: {root / 'sft'}" in (root / "rm" / "recipe.yaml").read_text()
    assert (root / "ppo" / "adapter_config.json").is_file()  # rlhf_tiny's PPO trains a LoRA policy
    assert "score" in ppo["metrics"]["after"] and "pairwise_accuracy" in manifest(root / "rm")["metrics"]["after"]

    spelt_otherwise = root.parent / ".." / root.parent.name / root.name  # the same place: still all finished
    again = _pipeline_cli("rlhf_tiny", "--output-dir", str(spelt_otherwise), *FAST, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already holds a finished run; skipped") == 3, again.stdout
    assert "launcher/run.py" not in again.stdout.replace("skipped", "")  # nothing launched
    # a finished stage whose settings changed is not skipped silently (PPO would train on the old reward model)
    changed = _pipeline_cli("rlhf_tiny", "--output-dir", str(root), *FAST, "rm:training.learning_rate=0.5",
                            timeout=120)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert f"pipeline stage 'rm': {root / 'rm'} finished with other settings (training.learning_rate:" in \
        changed.stderr


def test_pipeline_dry_run_substitutes_stage_outputs(tmp_path, capsys):
    root = tmp_path / "p"
    rc = run_inprocess("pipeline", "rlhf_tiny", "--output-dir", str(root), "--dry-run", "--num-gpus", "2",
                       "training.max_steps=5", "ppo:training.max_steps=2")
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "launcher/run.py" in line]
    assert len(lines) == 3
    assert all("deepspeed --num_gpus 2" in line for line in lines)
    sft, rm, ppo = lines
    assert "--recipe sft_tiny" in sft and f"output_dir={root / 'sft'}" in sft
    assert f"model.name={root / 'sft'}" in rm and f"output_dir={root / 'rm'}" in rm
    assert f"model.name={root / 'sft'}" in ppo and f"ppo.reward_model={root / 'rm'}" in ppo
    assert ppo.index("training.max_steps=5") < ppo.index("training.max_steps=2")  # the stage's own wins
    assert "training.max_steps=2" not in sft
    assert not root.exists()


def test_pipeline_checks_every_stage_before_running(tmp_path, capsys):
    with pytest.raises(UserError, match="pipeline stage 'ppo': peft.r"):
        from launcher.pipeline import cmd_pipeline

        cmd_pipeline(["rlhf_tiny", "--output-dir", str(tmp_path), "ppo:peft.r=0"])
    assert not any(tmp_path.iterdir())
    assert run_inprocess("pipeline", "rlhf_tiny", "nostage:training.max_steps=1") == 2
    assert "no stage 'nostage'" in capsys.readouterr().err
    assert run_inprocess("pipeline", "sft_tiny") == 2
    assert "has no pipeline: section" in capsys.readouterr().err


def test_pipeline_stage_validation():
    from launcher.config import load_recipe
    from launcher.pipeline import load_stages

    cfg = load_recipe("rlhf_tiny")
    assert [s["name"] for s in load_stages(cfg)] == ["sft", "rm", "ppo"]
    cfg.method_args["pipeline"] = {"stages": [{"name": "a", "recipe": "sft_tiny", "overrides": ["model.name={b}"]},
                                              {"name": "b", "recipe": "rm_tiny"}]}
    with pytest.raises(UserError, match=r"refers to \{b\}, which is not an earlier stage"):
        load_stages(cfg)
    cfg.method_args["pipeline"] = {"stages": [{"name": "a", "recipe": "no_such_recipe"}]}
    with pytest.raises(UserError, match="unknown recipe 'no_such_recipe'"):
        load_stages(cfg)
    cfg.method_args["pipeline"] = {"stages": [{"name": "a", "recipe": "sft_tiny", "overrides": ["output_dir=x"]}]}
    with pytest.raises(UserError, match="output_dir is set by the pipeline"):
        load_stages(cfg)


def test_rlhf_7b_pipeline_plans_offline(capsys):
    """The 7B pipeline names hub models and datasets; its stages resolve without any download."""
    rc = run_inprocess("pipeline", "rlhf_7b", "--dry-run", "--num-gpus", "8")
    assert rc == 0
    out = capsys.readouterr().out
    assert "--recipe lora_7b" in out and "--recipe rm_7b" in out and "ppo.reward_model=runs/rlhf_7b/rm" in out
