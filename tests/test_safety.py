"""Training health (NaN/inf, exploding gradients) and safe defaults (safetensors, weights_only, no remote code, no
secrets in the output directory)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, manifest, run_inprocess
from launcher import checkpoints as ck
from launcher.config import available_recipes, load_recipe

TINY = ["data.num_examples=64", "eval.num_examples=1", "plan.global_batch_size=8", "training.save_steps=1",
        "training.warmup_steps=0", "training.logging_steps=5"]


# ---- HealthGuard, unit ----------------------------------------------------------------------------------------------

def guard(**safety):
    from recipes.callbacks import HealthGuard

    return HealthGuard(SimpleNamespace(**{"stop_on_nan": True, "max_grad_norm_abort": None, **safety}))


def control():
    return SimpleNamespace(should_log=False, should_save=True, should_training_stop=False)


@pytest.mark.parametrize("logs,safety,expected", [
    ({"loss": float("nan"), "grad_norm": 1.0}, {}, "loss is nan"),
    ({"loss": float("inf"), "grad_norm": 1.0}, {}, "loss is inf"),
    ({"loss": 2.0, "grad_norm": float("inf")}, {}, "gradient norm is inf"),
    ({"loss": 2.0, "grad_norm": 4177.4}, {"max_grad_norm_abort": 1000.0},
     "gradient norm 4.18e+03 exceeds safety.max_grad_norm_abort=1000"),
])
def test_guard_stops_and_never_saves_a_diverged_state(tmp_path, logs, safety, expected):
    g, c = guard(**safety), control()
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=7)
    g.on_log(args, state, c, logs=logs)
    assert c.should_training_stop and not c.should_save
    assert g.stop_reason.startswith(f"training diverged at step 7: {expected}; no checkpoint was saved before it")
    assert "\n" not in g.stop_reason


def test_guard_names_the_last_good_checkpoint(tmp_path):
    for step in (4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    ck.mark_complete(tmp_path / "checkpoint-4")  # checkpoint-5 unmarked: not good
    g = guard()
    g.on_log(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=6), control(),
             logs={"loss": float("nan")})
    assert "the last good checkpoint checkpoint-4 is kept" in g.stop_reason


def test_guard_healthy_values_pass_and_logging_is_forced_each_step():
    g, c = guard(max_grad_norm_abort=10.0), control()
    g.on_log(SimpleNamespace(output_dir="/nonexistent"), SimpleNamespace(global_step=1), c,
             logs={"loss": 3.0, "grad_norm": 9.9})
    assert g.stop_reason is None and not c.should_training_stop and c.should_save
    g.on_step_end(None, None, c)
    assert c.should_log, "HF logs every logging_steps; the guard asks for every step so it sees each loss"
    off = guard(stop_on_nan=False)
    c2 = control()
    off.on_step_end(None, None, c2)
    assert not c2.should_log, "nothing to check: no extra logging"


def test_progress_printer_keeps_logging_steps_cadence(capsys):
    from recipes.callbacks import ProgressPrinter

    p = ProgressPrinter(SimpleNamespace(env=SimpleNamespace(is_main=True)))
    args = SimpleNamespace(logging_steps=3, logging_first_step=False)
    state = SimpleNamespace(global_step=0, max_steps=6, num_input_tokens_seen=0)
    p.on_train_begin(args, state, None)
    for step, loss in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=1):
        state.global_step = step
        p.on_log(args, state, None, logs={"loss": loss, "learning_rate": 1e-3})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "step 3/6 | loss 2.0000" in lines[0] and "step 6/6 | loss 5.0000" in lines[1], lines


def test_safety_section_ranges():
    from launcher.errors import UserError

    load_recipe("lora_tiny", overrides=["safety.max_grad_norm_abort=100", "training.eos_token=<|im_end|>"])
    for bad in ("safety.keep_checkpoints=0", "safety.max_grad_norm_abort=0", "safety.max_grad_norm_abort=.inf"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            load_recipe("lora_tiny", overrides=[bad])


# ---- divergence, end to end -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_nan_loss_stops_run_keeps_last_good_checkpoint(tmp_path, capsys):
    """learning_rate=1e30: Adam moves every LoRA weight by ~1e30 at step 1, so B@A overflows and the step-2 loss is
    NaN. The run stops at step 2 (not at the next logging_steps=5), exit 1, one line; checkpoint-1 stays."""
    out = tmp_path / "out"
    code = run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "training.max_steps=6",
                         "training.learning_rate=1e30", *TINY)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlaunch")]
    assert code == 1
    assert len(err) == 1 and err[0].startswith("ftlaunch: error: training diverged at step 2: loss is nan; "
                                               "the last good checkpoint checkpoint-1 is kept"), err
    m = manifest(out)
    assert m["status"] == "failed" and m["step"] == 2 and m["error"] == err[0].removeprefix("ftlaunch: error: ")
    assert [p.name for p in ck.checkpoints(out)] == ["checkpoint-1"] and ck.is_complete(out / "checkpoint-1")
    assert not (out / "adapter_model.safetensors").exists(), "a diverged model is not saved as the result"
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values()), "the kept checkpoint is finite"


def test_a_refused_run_removes_only_what_it_created(tmp_path, capsys):
    """Bad data is refused after output_dir was made: the directories this run created go (parents included),
    a directory the user made beforehand, even an empty one, stays."""
    bad = [f"data.source={tmp_path / 'missing.jsonl'}", *TINY]
    assert run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={tmp_path / 'a' / 'b' / 'out'}", *bad) == 2
    assert not (tmp_path / "a").exists()
    # a parent it created that another run has started in meanwhile stays, with that run's directory
    other = tmp_path / "a" / "b" / "other"
    from launcher.errors import remove_created, writable_dir

    created = writable_dir(tmp_path / "a" / "b" / "out", "output_dir")
    other.mkdir()
    remove_created(tmp_path / "a" / "b" / "out", created)
    assert other.is_dir() and not (tmp_path / "a" / "b" / "out").exists()
    (tmp_path / "mine").mkdir()
    assert run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={tmp_path / 'mine'}", *bad) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    assert "missing.jsonl" in capsys.readouterr().err


def test_one_live_run_per_output_dir(tmp_path, capsys):
    """A second run into an output_dir that a live run holds (a sweep submitted twice) is refused, naming the
    holder; once the holder's process has ended (crashed, requeued), its lock is gone and a run goes ahead."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from launcher.manifest import "
                               f"hold_output_dir; hold_output_dir({str(out)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={"SLURM_JOB_ID": "4242", "PATH": "/usr/bin:/bin"})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", *TINY) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is in use by a run that is still going (pid" in err and "job 4242" in err, err
        assert out.is_dir() and not (out / "manifest.json").exists()
        # the same Slurm job, requeued after its node died: a network file system may still hold the old start's
        # lock for a while; it waits that long for it, then goes on (in-process: no lock taken, a warning said)
        from launcher.manifest import hold_output_dir, release_output_dir

        os.environ["SLURM_JOB_ID"] = "4242"
        try:
            assert hold_output_dir(out, own_stale_s=0.3) is None
            assert "still locked by this job's previous start" in capsys.readouterr().err
        finally:
            del os.environ["SLURM_JOB_ID"]
            release_output_dir()
    finally:
        holder.kill()
        holder.wait()
    assert run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "training.max_steps=1", *TINY) == 0


# ---- safe defaults ------------------------------------------------------------------------------------------------

WANDB = "wandb-planted-7c1e9f5d2b8a4e6f"
HF = "hf_PlantedSecretTokenAbcdefghijklmnop"


def test_redaction_hits_secret_keys_only(monkeypatch):
    from launcher.manifest import redact

    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    data = {"hub_token": "x" * 8, "WANDB_API_KEY": "y" * 8, "db": {"password": "p" * 8}, "api-key": "k" * 8,
            "max_tokens": 42, "include_num_input_tokens_seen": "all", "author": "me", "note": f"key {WANDB} here"}
    got = redact(data)
    assert got["hub_token"] == got["WANDB_API_KEY"] == got["db"]["password"] == got["api-key"] == "***"
    assert got["max_tokens"] == 42 and got["include_num_input_tokens_seen"] == "all" and got["author"] == "me"
    assert got["note"] == "key *** here", "an environment secret is scrubbed wherever it appears"


def test_manifest_command_can_be_run_again(monkeypatch):
    """`ftlaunch run ...` is recorded with its sub-command; a launcher's per-rank --local_rank is not."""
    from launcher.manifest import replayable_command

    monkeypatch.setattr("sys.argv", ["/venv/bin/ftlaunch", "run", "--recipe", "lora_tiny"])
    assert replayable_command(["--recipe", "lora_tiny", "seed=1"]) == ["/venv/bin/ftlaunch", "run", "--recipe",
                                                                       "lora_tiny", "seed=1"]
    monkeypatch.setattr("sys.argv", ["launcher/run.py", "--local_rank=1", "--recipe", "lora_tiny"])
    assert replayable_command(["--local_rank=1", "--recipe", "lora_tiny"]) == ["launcher/run.py", "--recipe",
                                                                               "lora_tiny"]


def test_secret_overrides_are_refused(tmp_path, capsys):
    """A token on the command line would be pickled into every checkpoint's training_args.bin: refused, exit 2."""
    for override in (f"training.hub_token={HF}", f"rm.hf_token={HF}", f"description={HF}"):
        out = tmp_path / "out"
        assert run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", override) == 2
        err = capsys.readouterr().err
        assert "looks like a secret" in err and HF not in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.slow
def test_no_secret_reaches_the_output_dir_and_weights_are_safetensors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    monkeypatch.setenv("HF_TOKEN", HF)
    out = tmp_path / "out"
    # the env secret also typed into a harmless field: the manifest's command and recipe.yaml must redact it
    assert run_inprocess("run", "--recipe", "lora_tiny", f"output_dir={out}", "training.max_steps=2",
                         f"description=run {WANDB}", "data.max_length=8", *TINY) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    assert any("events.out.tfevents" in n for n in names), "tensorboard events are part of the check"
    assert "training_args.bin" in names and "checkpoint-2/training_args.bin" in names
    for path in files:
        data = path.read_bytes()
        for secret in (WANDB, HF):
            assert secret.encode() not in data, f"{secret[:8]}... found in {path.relative_to(out)}"
    m = manifest(out)
    data = m["metrics"]["data"]  # too-long rows (max_length=8) are truncated and counted in the summary
    assert data["too_long"] == "truncate" and data["truncated"] > 0 and data["truncated"] <= data["rows_read"], data
    assert "***" in m["config"]["description"]
    assert any("***" in part for part in m["command"]) and m["seed"] == 42 and m["git_revision"]
    assert m["versions"]["torch"] and m["versions"]["transformers"] and m["plan"] and m["world_size"] == 1
    # weights: safetensors only (transformers 5 has no pickle-weights option left); HF's own checkpoint extras
    # (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin) are pickles it loads with weights_only=True,
    # except training_args.bin, which nothing loads on resume.
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    weight_pickles = [n for n in names if re.search(r"(model|adapter)[^/]*\.(bin|pt|pth)$", n)]
    assert weight_pickles == [], weight_pickles
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # readable as every other file is (safetensors itself writes 0600, whatever the umask)
    mode = (out / "recipe.yaml").stat().st_mode & 0o777
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*.safetensors")} == {mode}


def _our_python_files():
    return [p for d in ("launcher", "recipes", "bench") for p in (REPO / d).rglob("*.py")]


def test_torch_load_only_with_weights_only():
    offenders = []
    for path in _our_python_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_no_code_evaluated_from_configs():
    pattern = re.compile(r"(?<![\w.])(eval|exec)\(|pickle\.loads?\(|yaml\.load\((?!.*Loader=_Loader)|yaml\.unsafe_load|"
                         r"dill\.|marshal\.loads|__import__\(")
    offenders = []
    for path in _our_python_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_no_remote_code_by_default(name):
    assert load_recipe(name).model.trust_remote_code is False


def test_builder_passes_trust_remote_code_from_config_only():
    text = (REPO / "recipes" / "builder.py").read_text()
    uses = re.findall(r"trust_remote_code=([\w.]+)", text)
    assert uses and set(uses) == {"cfg.model.trust_remote_code"}, uses
    assert "trust_remote_code=True" not in "".join(p.read_text() for p in _our_python_files())


def test_a_rank_exit_runs_the_exit_handlers_flushes_and_keeps_its_code(tmp_path):
    """launcher/run.py ends a rank with exit_rank (no interpreter teardown): what a normal exit does must still happen."""
    marker = tmp_path / "atexit"
    script = (f"import atexit, sys; sys.path.insert(0, {str(REPO)!r}); from launcher.dist import exit_rank\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
              "print('block-buffered to a pipe', end=''); sys.stderr.write('to stderr')\n"
              "exit_rank(143)\nraise SystemExit(1)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (143, "block-buffered to a pipe", "to stderr")
    assert marker.read_text() == "ran"
