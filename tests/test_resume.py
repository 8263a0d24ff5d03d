"""Resume exactness and checkpoints that cannot be half-written.

* 2-rank ZeRO-2 CPU run SIGKILLed (whole `deepspeed` process group) at 5 random steps, resumed with `--resume auto`
  each time: final weights and the per-step loss history equal an uninterrupted run's, bitwise.
* A kill while a checkpoint is being committed (with `safety.keep_checkpoints=1`) leaves the previous checkpoint
  complete and loadable; resume reports and skips the unfinished one.
* A 2-rank ZeRO-2 checkpoint resumed on 1 DeepSpeed rank: its partitions are re-cut (DeepSpeed's universal
  checkpoint) and the run ends where the 2-rank run ends, up to float summation order. Changing the launcher
  (DeepSpeed <-> one plain process), or the rank count without DeepSpeed, is refused with one line (exit 2).
* Unit tests of the completion marker, rotation and resume selection (no training).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, manifest, run_inprocess
from launcher import checkpoints as ck
from recipes.callbacks import CheckpointCommitter


def _bench():
    spec = importlib.util.spec_from_file_location("bench_resume", REPO / "bench" / "resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_checkpoint(out: Path, step: int, complete: bool = True, world_size: int = 1, deepspeed: bool = False,
                    zero_stage: int = 2) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(b"x" * 16)
    if deepspeed:
        (path / f"global_step{step}").mkdir()
        for rank in range(world_size if zero_stage else 0):  # ZeRO-0 keeps the optimizer in mp_rank_00_model_states
            (path / f"global_step{step}" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        ck.mark_complete(path, {"world_size": world_size, "deepspeed": deepspeed})
    return path


# ---- unit: marker, rotation, resume selection ----------------------------------------------------------------------

def test_newest_complete_skips_unmarked(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # killed while saving: files there, marker not
    assert ck.newest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    chosen, skipped = ck.prepare_resume(tmp_path, is_main=True)
    assert chosen.name == "checkpoint-10" and [p.name for p in skipped] == ["checkpoint-12"]
    assert not (tmp_path / "checkpoint-12").exists(), "rank 0 removes the unfinished checkpoint"
    assert ck.newest_complete_checkpoint(tmp_path / "nope") is None


def test_trainer_state_alone_is_not_complete(tmp_path):
    path = fake_checkpoint(tmp_path, 3, complete=False)
    assert (path / "trainer_state.json").exists() and not ck.is_complete(path)


def test_rotate_keeps_k_and_never_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 5, complete=False)
    deleted = ck.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-2", "checkpoint-5"]
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    ck.rotate(tmp_path, keep=1, protect=(str(tmp_path / "checkpoint-3"),))  # best model is protected
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]


def test_half_deleted_checkpoint_is_never_complete(tmp_path, monkeypatch):
    """Deletion removes the marker first: a kill half-way through rmtree leaves an *incomplete* directory."""
    old = fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)

    def killed_mid_rmtree(path, ignore_errors=False):
        raise SystemExit("killed")

    monkeypatch.setattr(ck.shutil, "rmtree", killed_mid_rmtree)
    with pytest.raises(SystemExit):
        ck.rotate(tmp_path, keep=1)
    assert old.exists() and not ck.is_complete(old)
    assert ck.newest_complete_checkpoint(tmp_path).name == "checkpoint-2"


def test_committer_takes_over_rotation_from_hf(tmp_path):
    """HF rotates inside _save_checkpoint, before any callback: with save_total_limit=1 it would delete the previous
    checkpoint before the new one is marked. The committer disables that and rotates after marking."""
    args = SimpleNamespace(save_total_limit=1, output_dir=str(tmp_path), world_size=1, deepspeed=None)
    committer = CheckpointCommitter()
    committer.take_over_rotation(args)
    assert args.save_total_limit is None and committer.keep == 1
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2, complete=False)  # HF has just written it
    state = SimpleNamespace(global_step=2, is_world_process_zero=True, best_model_checkpoint=None)
    committer.on_save(args, state, SimpleNamespace())
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["checkpoint-2"] and ck.is_complete(tmp_path / "checkpoint-2")
    marker = json.loads((tmp_path / "checkpoint-2" / ck.MARKER).read_text())
    assert marker["step"] == 2 and marker["world_size"] == 1


def test_stale_marker_is_removed_before_rewrite(tmp_path):
    """Resuming an older checkpoint (`--resume PATH`): a later checkpoint-N is rewritten in place, so its old marker
    goes first."""
    fake_checkpoint(tmp_path, 4)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)
    CheckpointCommitter(keep=2).on_step_end(args, state, SimpleNamespace(should_save=True))
    assert not ck.is_complete(tmp_path / "checkpoint-4")


def test_resume_layouts_that_cannot_carry_the_optimizer_over(tmp_path):
    """DeepSpeed on a new rank count: re-cut through a universal checkpoint (True). Anything else that changes is
    refused: the plain Trainer silently starts a fresh optimizer from ZeRO shards (no optimizer.pt) and DeepSpeed
    cannot read a plain optimizer.pt; without DeepSpeed nothing re-cuts a per-rank layout."""
    from launcher.errors import UserError

    cases = iter(range(100))
    layout = lambda world, ds: fake_checkpoint(tmp_path / str(next(cases)), 6, world_size=world, deepspeed=ds)  # noqa

    assert ck.check_resumable(layout(2, True), 1, True) is True
    assert ck.check_resumable(layout(2, True), 2, True) is False
    assert ck.check_resumable(layout(1, False), 1, False) is False
    for world, ds, now_world, now_ds in ((1, False, 2, False), (1, False, 1, True), (2, True, 2, False)):
        with pytest.raises(UserError, match="cannot resume checkpoint-6"):
            ck.check_resumable(layout(world, ds), now_world, now_ds)
    # ZeRO-0 stores the optimizer state whole (no shards): it loads on any rank count as it is, into ZeRO-0 only
    zero0 = lambda world: fake_checkpoint(tmp_path / str(next(cases)), 6, world_size=world, deepspeed=True,  # noqa
                                          zero_stage=0)
    assert ck.checkpoint_layout(zero0(2))["zero_stage"] == 0
    assert ck.check_resumable(zero0(2), 1, True, zero_stage=0) is False
    with pytest.raises(UserError, match=r"with ZeRO-2: it was written with ZeRO-0; pin that stage \(plan.zero_stage=0"):
        ck.check_resumable(zero0(2), 1, True, zero_stage=2)
    with pytest.raises(UserError, match=r"with ZeRO-0: it was written with ZeRO-1, 2 or 3; .*\(plan.zero_stage=1\)"):
        ck.check_resumable(layout(2, True), 2, True, zero_stage=0)
    recorded = fake_checkpoint(tmp_path / "z2", 6, world_size=2, deepspeed=True)  # as CheckpointCommitter records it
    ck.mark_complete(recorded, {"world_size": 2, "deepspeed": True, "zero_stage": 2})
    assert ck.check_resumable(recorded, 1, True, zero_stage=2) is True  # re-cut through a universal checkpoint
    with pytest.raises(UserError, match=r"with ZeRO-3: it was written with ZeRO-2; pin that stage"):
        ck.check_resumable(recorded, 2, True, zero_stage=3)
    # ds_to_universal converts Adam's exp_avg / exp_avg_sq only: other optimizers keep their rank count
    assert ck.check_resumable(layout(2, True), 2, True, "paged_adamw_8bit") is False
    with pytest.raises(UserError, match="re-cuts only Adam's state .* not training.optim=paged_adamw_8bit"):
        ck.check_resumable(layout(2, True), 1, True, "paged_adamw_8bit")


def test_world_size_change_is_refused_in_one_line(tmp_path, capsys):
    """A 2-rank DeepSpeed checkpoint resumed by one plain process (no DeepSpeed) would silently start a fresh
    optimizer (no optimizer.pt): refused up front, exit 2."""
    out = tmp_path / "run"
    fake_checkpoint(out, 6, world_size=2, deepspeed=True)
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "data.num_examples=32")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "cannot resume checkpoint-6: it was written by 2 ranks with DeepSpeed, this run has 1 rank" in err[0]
    assert "same launcher and rank count" in err[0]
    assert ck.is_complete(out / "checkpoint-6"), "the checkpoint itself is left alone"


def _one_line(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_a_resume_that_would_mix_two_runs_is_refused(tmp_path, capsys):
    """Nothing of an earlier run is lost or mixed in: `--resume never` into a directory holding its checkpoints
    (the new run's lower-numbered ones would rotate out first, and a later resume would take the old run's);
    a resume under other model/PEFT settings (it would fail inside torch after rewriting the run's records); a run
    directory given where a checkpoint is expected. One line each, exit 2, the old run's files untouched."""
    import yaml

    from launcher.config import load_recipe, to_yaml_dict

    out = tmp_path / "run"
    fake_checkpoint(out, 6)
    recipe = yaml.safe_dump(to_yaml_dict(load_recipe("lora_tiny", None, [f"output_dir={out}"])), sort_keys=False)
    (out / "recipe.yaml").write_text(recipe)
    line = _one_line(run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "--resume", "never"), capsys)
    assert "holds checkpoints of an earlier run (checkpoint-6)" in line and "new output_dir" in line
    line = _one_line(run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "peft.r=8"), capsys)
    assert "cannot resume" in line and "peft.r=16 (now 8)" in line and "same settings" in line
    from launcher.checkpoints import check_same_settings

    # what the saved tensors do not depend on may change; an older recipe.yaml's missing key says nothing
    settings = to_yaml_dict(load_recipe("lora_tiny", None, [f"output_dir={out}", "model.attn_implementation=eager",
                                                            "peft.dropout=0.1", "training.learning_rate=0.5"]))
    check_same_settings(out / "checkpoint-6", settings)
    older = yaml.safe_load(recipe)
    del older["peft"]["r"]
    (out / "recipe.yaml").write_text(yaml.safe_dump(older))
    check_same_settings(out / "checkpoint-6", to_yaml_dict(load_recipe("lora_tiny", None, ["peft.r=8"])))
    (out / "recipe.yaml").write_text(recipe)
    elsewhere = tmp_path / "other"
    line = _one_line(run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={elsewhere}", "--resume", str(out)),
                     capsys)
    assert f"did you mean --resume {out / 'checkpoint-6'}?" in line and not elsewhere.exists()
    assert (out / "recipe.yaml").read_text() == recipe and ck.is_complete(out / "checkpoint-6")


def test_a_finished_run_is_redone_by_nothing_and_changed_by_nothing(tmp_path, capsys):
    """The same command into a finished run's directory does nothing (exit 0); other trained settings, --resume
    never or a checkpoint path that is not one are refused in one line (they were ignored with exit 0)."""
    from launcher.config import load_recipe
    from launcher.manifest import write_manifest

    out = tmp_path / "run"
    fake_checkpoint(out, 6)
    cfg = load_recipe("lora_tiny", None, [f"output_dir={out}"])
    write_manifest(out, cfg, {}, ["ftlaunch", "run"], "finished", 1)
    base = ("run", "--recipe", "lora_tiny", f"output_dir={out}")
    assert run_inprocess(*base, "eval.num_examples=3") == 0  # how it is evaluated is not what it trained
    assert "already holds a finished run (step ?); nothing to do" in capsys.readouterr().out
    line = _one_line(run_inprocess(*base, "training.max_steps=8"), capsys)
    assert "already holds a finished run with other settings (training.max_steps: 300 -> 8)" in line
    assert "--resume never: " in _one_line(run_inprocess(*base, "--resume", "never"), capsys)
    assert "not a checkpoint directory" in _one_line(run_inprocess(*base, "--resume", str(tmp_path / "nope")), capsys)
    assert (out / "checkpoint-6").is_dir()


def test_ctrl_c_leaves_an_interrupted_record(tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-run (KeyboardInterrupt at a step boundary): exit 130 and the manifest says interrupted at that
    step, not 'running' for ever."""
    from transformers import TrainerCallback

    from recipes import common

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    real = common.default_callbacks
    monkeypatch.setattr(common, "default_callbacks", lambda ctx, trainer: [*real(ctx, trainer), CtrlC()])
    out = tmp_path / "out"
    assert run_inprocess("run", *SMALL, "training.max_steps=6", f"output_dir={out}") == 130
    m = manifest(out)
    assert (m["status"], m["step"]) == ("interrupted", 2), m
    assert "ftlaunch: interrupted" in capsys.readouterr().err


# ---- real runs ---------------------------------------------------------------------------------------------------

KILL_IN_COMMIT = """
import os, signal, sys
sys.path[0] = {repo!r}
from launcher import checkpoints
real = checkpoints.mark_complete
def mark_complete(path, info=None):
    if checkpoints.step_of(path) == {step}:
        os.kill(os.getpid(), signal.SIGKILL)  # HF has written (and would have rotated) everything; marker not yet
    return real(path, info)
checkpoints.mark_complete = mark_complete
from launcher.cli import main
sys.exit(main(["run", *sys.argv[1:]]))
"""

SMALL = ["--recipe", "lora_tiny", "data.num_examples=64", "eval.num_examples=1", "plan.global_batch_size=8",
         "training.save_steps=1", "training.logging_steps=2", "safety.keep_checkpoints=1"]


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    script = KILL_IN_COMMIT.format(repo=str(REPO), step=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script, *SMALL, "training.max_steps=4", f"output_dir={out}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # keep_checkpoints=1: HF's own rotation would have deleted checkpoint-2 by now; ours waits for the marker
    assert ck.is_complete(out / "checkpoint-2") and (out / "checkpoint-3").is_dir()
    assert not ck.is_complete(out / "checkpoint-3")
    assert manifest(out)["status"] == "running"

    assert run_inprocess("run", *SMALL, "training.max_steps=4", f"output_dir={out}") == 0
    captured = capsys.readouterr()
    assert "skipping incomplete checkpoint-3" in captured.err and f"resuming from {out / 'checkpoint-2'}" in captured.out
    m = manifest(out)
    assert m["status"] == "finished" and m["metrics"]["global_step"] == 4 and m["attempts"] == 2
    assert m["metrics"]["before"]["n"] == 1, "the first attempt's baseline evaluation survives the kill"
    assert [p.name for p in ck.checkpoints(out)] == ["checkpoint-4"] and ck.is_complete(out / "checkpoint-4")
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4], "per-step health checks"


def test_killed_after_its_final_checkpoint_resumes_without_an_extra_step(tmp_path, capsys):
    """HF's loop would take step max_steps + 1 after resuming from the final checkpoint; the run must just finish."""
    from launcher.manifest import update_manifest

    out = tmp_path / "out"
    assert run_inprocess("run", *SMALL, "training.max_steps=4", "training.save_steps=2", f"output_dir={out}") == 0
    final = out / "checkpoint-4"
    (out / "adapter_model.safetensors").unlink()  # as if killed after checkpoint-4, before the final save
    update_manifest(out, status="running")
    capsys.readouterr()
    assert run_inprocess("run", *SMALL, "training.max_steps=4", "training.save_steps=2", f"output_dir={out}") == 0
    assert f"resuming from {final}" in capsys.readouterr().out
    m = manifest(out)
    assert m["status"] == "finished" and m["metrics"]["global_step"] == 4 and m["attempts"] == 2
    assert [p.name for p in ck.checkpoints(out)][-1] == "checkpoint-4"
    assert _bench().compare_weights(final / "adapter_model.safetensors", out / "adapter_model.safetensors") == 0.0


@pytest.mark.slow
def test_two_rank_zero2_sigkill_resume_is_bitwise_exact(tmp_path, capsys):
    bench = _bench()
    # A kill can land a few steps late (a step takes ~50 ms here), which moves the next target past it: the kill
    # points stay in the first half so that five of them always happen before the last step.
    steps = 16
    seed = int(os.environ.get("FTLAUNCH_KILL_SEED", random.randrange(1 << 30)))
    kill_steps = sorted(random.Random(seed).sample(range(2, steps // 2 + 2), 5))
    print(f"kill seed {seed}: SIGKILL at steps {kill_steps}")

    # every checkpoint kept: the rank-count resume below starts from checkpoint-8 (rotation changes nothing else)
    rc, text = bench.run_to_end(tmp_path / "ref", steps, extra=[f"safety.keep_checkpoints={steps}"])
    assert rc == 0, text[-3000:]
    report = bench.killed_run(tmp_path / "killed", steps, kill_steps, seed)
    print("\n".join(report["events"]))
    assert report["rc"] == 0, report["log"][-3000:]
    assert all(e.startswith("killed at") for e in report["events"]), report["events"]

    ref, got = tmp_path / "ref", tmp_path / "killed"
    m = manifest(got)
    assert m["status"] == "finished" and m["metrics"]["world_size"] == 2 and m["attempts"] == 6
    assert report["log"].count("resuming from") == 5
    # Bitwise: same seed, same data order (HF skips the consumed batches on resume; ignore_data_skip is False),
    # gloo all-reduce on CPU is deterministic, RNG/optimizer/scheduler states are restored from the checkpoint.
    assert bench.compare_weights(ref / "adapter_model.safetensors", got / "adapter_model.safetensors") == 0.0
    assert bench.loss_history(ref) == bench.loss_history(got)
    assert len(bench.loss_history(got)) == steps

    # The same checkpoint on 1 process: refused up front (see test_world_size_change_is_refused_in_one_line).
    one = tmp_path / "one-rank"
    one.mkdir()
    shutil.copytree(ck.checkpoints(got)[-1], one / ck.checkpoints(got)[-1].name)
    capsys.readouterr()
    assert run_inprocess("run", *bench.BASE, f"training.max_steps={steps + 2}", f"output_dir={one}") == 2
    assert "written by 2 ranks with DeepSpeed, this run has 1 rank" in capsys.readouterr().err

    # The 2-rank run's checkpoint-8 on 1 DeepSpeed rank: its ZeRO partitions are re-cut (universal checkpoint) and
    # the next 8 steps land where the 2-rank run's did, up to float summation order (same global batch, same data):
    # a fresh optimizer instead of the re-cut one would move the weights by ~lr per step.
    moved, start = tmp_path / "moved", steps // 2
    moved.mkdir()
    shutil.copytree(ref / f"checkpoint-{start}", moved / f"checkpoint-{start}")
    rc, text = bench.run_to_end(moved, steps, ranks=1, extra=[f"safety.keep_checkpoints={steps}"])
    assert rc == 0, text[-3000:]
    assert "re-cutting its ZeRO partitions" in text
    assert (moved / f"checkpoint-{start}" / "latest_universal").read_text() == f"global_step{start}_universal"
    assert bench.compare_weights(ref / "adapter_model.safetensors", moved / "adapter_model.safetensors") < 1e-5
    after = lambda run: [(s, l) for s, l in bench.loss_history(run) if s > start]  # noqa: E731
    assert [s for s, _ in after(moved)] == [s for s, _ in after(ref)] and len(after(ref)) >= 2
    assert [l for _, l in after(moved)] == pytest.approx([l for _, l in after(ref)], abs=1e-5)
    assert ck.checkpoint_layout(moved / f"checkpoint-{steps}")["world_size"] == 1
    assert "load_universal" not in (moved / "ds_config.json").read_text()  # that start's switch only


@pytest.mark.slow
def test_zero0_checkpoint_resumes_on_a_new_rank_count(tmp_path):
    """The planner's ZeRO-0 (what lora_tiny gets on 2 CPU ranks) writes no ZeRO shards for a universal checkpoint to
    re-cut: its whole optimizer state loads on one rank as it is (a traceback from ds_to_universal before)."""
    bench = _bench()
    base = [("plan.zero_stage=0" if a == "plan.zero_stage=2" else a) for a in bench.BASE]
    two, one = tmp_path / "two", tmp_path / "one"
    rc, text = bench.run_to_end(two, 4, ranks=2, base=base, extra=["safety.keep_checkpoints=4"])
    assert rc == 0, text[-3000:]
    assert ck.checkpoint_layout(two / "checkpoint-2") == {"world_size": 2, "deepspeed": True, "zero_stage": 0}
    one.mkdir()
    shutil.copytree(two / "checkpoint-2", one / "checkpoint-2")
    rc, text = bench.run_to_end(one, 4, ranks=1, base=base)
    assert rc == 0, text[-3000:]
    assert "resuming from" in text and "re-cutting" not in text
    assert manifest(one)["status"] == "finished" and manifest(one)["metrics"]["global_step"] == 4
    # the same two steps from the same state, on one rank instead of two (same global batch): float summation order
    assert bench.compare_weights(two / "adapter_model.safetensors", one / "adapter_model.safetensors") < 1e-5


@pytest.mark.slow
def test_rank_count_resume_then_load_best_model(tmp_path):
    """cls_tiny keeps the best checkpoint (load_best_model_at_end). Resumed on a new rank count, the engine loaded
    a universal checkpoint; loading the best one at the end must read this run's ordinary checkpoint, which has
    none (DeepSpeed: "Invalid for universal checkpoint: .../latest_universal does not exist" before the fix)."""
    bench = _bench()
    base = ["--recipe", "cls_tiny", "classify.eval_steps=2", "training.save_steps=2", "data.num_examples=320",
            "eval.num_examples=0", "plan.zero_stage=2", "safety.keep_checkpoints=4"]
    two, one = tmp_path / "two", tmp_path / "one"
    rc, text = bench.run_to_end(two, 4, ranks=2, base=base)
    assert rc == 0, text[-3000:]
    one.mkdir()
    shutil.copytree(two / "checkpoint-2", one / "checkpoint-2")
    # unpinned now: the resumed run plans for the stage that wrote its checkpoint, not one of its own choosing
    rc, text = bench.run_to_end(one, 4, ranks=1, base=[a for a in base if a != "plan.zero_stage=2"])
    assert rc == 0, text[-3000:]
    assert "re-cutting its ZeRO partitions" in text
    m = manifest(one)
    assert m["plan"]["zero_stage"] == 2
    assert any("the stage that wrote checkpoint-2" in line for line in m["plan"]["reasons"]), m["plan"]["reasons"]
    assert m["status"] == "finished" and m["metrics"]["global_step"] == 4 and m["metrics"]["world_size"] == 1
