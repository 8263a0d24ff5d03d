"""`ftlaunch slurm`: the sbatch renderer (pure unit tests) and the rendered scripts on a real Slurm cluster that the
session fixture starts on this machine (tests/slurm_cluster.py; needs root and Debian's slurm packages, skipped with
the reason otherwise, failed when CI=true)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.slurm import SHIPPED, cmd_slurm, parse_time_limit, render_sbatch, render_shipped
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (slurm_cluster: the session fixture)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- renderer
def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_multinode_script_has_literal_sbatch_lines():
    s = render_sbatch("sft_7b", 4, 8, "12:00:00", "gpu", ["plan.zero_stage=3", "output_dir=runs/x"])
    lines = sbatch_lines(s)
    for expected in ["--nodes=4", "--ntasks-per-node=1", "--gres=gpu:8", "--time=12:00:00", "--partition=gpu",
                     "--requeue", "--open-mode=append", "--signal=B:USR1@300", "--output=slurm/%x-%j.out",
                     "--cpus-per-task=64", "--exclusive", f"--chdir={REPO}", "--job-name=ftl-sft_7b"]:
        assert f"#SBATCH {expected}" in lines, (expected, lines)
    assert not any("$" in line for line in lines), "no variables in #SBATCH lines (sbatch does not expand them)"
    assert s.startswith("#!/bin/bash\n")
    body = s.split("\n\n", 1)[1]
    assert "#SBATCH" not in body.split("set -euo pipefail")[1], "#SBATCH after the first command is ignored"
    assert "torch.distributed.run" in s and '--node_rank="$SLURM_NODEID"' in s
    assert "--nnodes=\"$NNODES\"" in s and "NNODES=4" in s and "NPROC_PER_NODE=8" in s
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in s
    assert "SLURM_JOB_ID % 12000" in s
    assert 'scontrol requeue "$SLURM_JOB_ID"' in s and "trap on_warning USR1" in s
    assert "export OMP_NUM_THREADS" in s
    assert "RUN_ARGS=(--recipe sft_7b plan.zero_stage=3 output_dir=runs/x)" in s


def test_single_gpu_script_runs_one_process_without_launcher():
    s = render_sbatch("qlora_7b", 1, 1)
    lines = sbatch_lines(s)
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --nodes=1" in lines
    assert "#SBATCH --exclusive" not in lines
    assert "torch.distributed.run" not in s and '"$PYTHON" launcher/run.py "${RUN_ARGS[@]}"' in s


def test_cpu_ranks_have_no_gres_and_are_not_exclusive():
    lines = sbatch_lines(render_sbatch("lora_tiny", 2, 0, "10"))
    assert not any("gres" in line or "exclusive" in line for line in lines)
    assert "#SBATCH --time=10" in lines and "#SBATCH --signal=B:USR1@150" in lines  # a quarter of a short limit


def test_values_with_spaces_are_quoted_in_the_command():
    s = render_sbatch("lora_tiny", 1, 0, extra_overrides=["output_dir=/tmp/a b"], validate=False)
    assert "RUN_ARGS=(--recipe lora_tiny 'output_dir=/tmp/a b')" in s


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("04:00:00", 14400), ("90:30", 5430), ("1-12", 129600),
                                          ("2-00:30:00", 174600), ("1-0:1", 86460)])
def test_time_formats(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("kwargs,message", [
    (dict(recipe="nope"), "unknown recipe"),
    (dict(recipe="lora_tinny"), "did you mean 'lora_tiny'"),
    (dict(recipe=None), "exactly one of"),
    (dict(nodes=0), "--nodes"),
    (dict(nodes="two"), "--nodes"),
    (dict(gpus_per_node=-1), "--gpus-per-node"),
    (dict(time="4h"), "--time"),
    (dict(time="0"), "--time"),
    (dict(partition="$PART"), "--partition"),
    (dict(partition="a b"), "--partition"),
    (dict(output="logs/$USER.out"), "--output"),
    (dict(extra_overrides=["not-an-override"]), "override"),
    (dict(extra_overrides=["data.num_exampels=3"]), "did you mean 'num_examples'"),
    (dict(extra_overrides=["training.max_step=3"]), "did you mean 'training.max_steps'"),
    (dict(time="00:10:00", signal_seconds=600), "before the time limit"),
    (dict(mem="lots"), "--mem"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    args = dict(recipe="lora_tiny", nodes=1, gpus_per_node=1)
    args.update(kwargs)
    with pytest.raises(UserError, match=re.escape(message)):
        render_sbatch(**args)


def test_cmd_slurm_prints_and_writes(tmp_path, capsys):
    assert cmd_slurm(["--recipe", "lora_tiny", "--nodes", "2", "--gpus-per-node", "4", "--time", "01:00:00",
                      "--partition", "p1", "--", "training.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gres=gpu:4" in out and "training.max_steps=5" in out
    target = tmp_path / "job.sbatch"
    assert cmd_slurm(["--recipe", "lora_tiny", "--nodes", "1", "--gpus-per-node", "1", "--write", str(target)]) == 0
    assert target.read_text().startswith("#!/bin/bash")
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):  # the CLI makes it one line, exit 2
        cmd_slurm(["--recipe", "lora_tiny", "--bogus"])


def test_paths_typed_outside_the_checkout_still_hold_in_the_job(tmp_path, monkeypatch):
    """The job starts in the checkout (#SBATCH --chdir): a --config, data file or output_dir typed relative to
    another directory is written into the script as an absolute path; hub ids and names stay as typed."""
    from launcher.config import RECIPE_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pc.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (tmp_path / "my.yaml").write_text((RECIPE_DIR / "lora_tiny.yaml").read_text())
    script = render_sbatch(None, 1, 1, "01:00:00", None, ["data.source=[pc.jsonl, pc.jsonl]", "output_dir=runs/x",
                                                           "data.eval_source=pc.jsonl", "model.tokenizer=null"],
                           config="my.yaml")
    args = next(line for line in script.splitlines() if line.startswith("RUN_ARGS="))
    assert f"--config {tmp_path / 'my.yaml'}" in args and f"data.eval_source={tmp_path / 'pc.jsonl'}" in args
    assert f"output_dir={tmp_path / 'runs' / 'x'}" in args
    assert f"data.source=[{tmp_path / 'pc.jsonl'}, {tmp_path / 'pc.jsonl'}]" in args
    assert "model.tokenizer=null" in args  # not a path: kept as typed


FAKE_SRUN = """#!/bin/bash
# a training step: on the warning it saves too slowly (only a TERM ends it), or stops with a checkpoint as rank 0
# does (FAKE=preempt: writes `preempted` where the script reads it, exit 143), or has diverged (FAKE=diverge: exit 1)
echo started >> "$LOG"
on_usr1() {
    echo step-USR1 >> "$LOG"
    if [ "$FAKE" = preempt ]; then echo -n preempted > "$FTLAUNCH_EXIT_FILE"; exit 143; fi
    if [ "$FAKE" = diverge ]; then exit 1; fi
}
trap on_usr1 USR1
trap 'echo step-TERM >> "$LOG"; exit 143' TERM
while :; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$LOG"
[ "$1" = show ] && echo n1
[ "$2 $3" = "show job" ] && echo "JobId=7 JobState=COMPLETING Reason=$REASON"
exit 0
"""


def _run_script_with_fake_slurm(tmp_path, signals, fake="slow", recipe="lora_tiny", reason="TimeLimit"):
    """The rendered one-GPU script, run by bash with fake srun/scontrol on PATH; `signals`: what Slurm sends, in
    order, to (B:) the batch shell and the step. Returns (exit code, the fakes' log lines, the script's output)."""
    import os
    import subprocess

    (tmp_path / "bin").mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    for part in ("launcher", "slurm"):
        (tmp_path / part).mkdir()
    (tmp_path / "launcher" / "run.py").write_text("")
    (tmp_path / "job.sh").write_text(render_sbatch(recipe, 1, 1, "10", workdir=None, validate=recipe != "lora_tiny"))
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", LOG=str(log), SLURM_JOB_ID="7",
               SLURM_JOB_NODELIST="n1", SLURM_RESTART_COUNT="0", FAKE=fake, REASON=reason)
    job = subprocess.Popen(["bash", "job.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    deadline = time.time() + 20
    while not (log.exists() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    step = subprocess.run(["pgrep", "-f", f"{tmp_path / 'bin' / 'srun'}"], capture_output=True, text=True)
    for target, signum in signals:
        os.kill(job.pid if target == "batch" else int(step.stdout.split()[0]), signum)
        time.sleep(0.5)
    out, _ = job.communicate(timeout=20)
    return job.returncode, log.read_text().splitlines(), out


def test_time_limit_after_the_warning_requeues_at_once(tmp_path):
    """USR1 (the warning), then the time limit's TERM while the ranks still save: the batch shell requeues the job
    then, as Slurm kills it soon after (a requeue during the time-limit kill was tried on the test cluster: the job
    restarts); a TERM without a warning, or a scancel after it (Reason not TimeLimit), does not requeue."""
    import signal as sig

    rc, log, out = _run_script_with_fake_slurm(tmp_path, [("batch", sig.SIGUSR1), ("batch", sig.SIGTERM),
                                                          ("step", sig.SIGTERM)])
    assert "step-USR1" in log and "scontrol requeue 7" in log, (log, out)
    assert rc == 0 and "requeueing job 7 now" in out, out
    rc, log, out = _run_script_with_fake_slurm(tmp_path / "cancel", [("batch", sig.SIGTERM), ("step", sig.SIGTERM)])
    assert not any("requeue" in line for line in log) and rc == 143 and "not requeueing" in out, (log, out)
    # a scancel after the warning: TERM too, but the job's Reason is not TimeLimit
    rc, log, out = _run_script_with_fake_slurm(tmp_path / "late_cancel", [("batch", sig.SIGUSR1), ("batch", sig.SIGTERM),
                                                                           ("step", sig.SIGTERM)], reason="None")
    assert not any("requeue " in line for line in log) and rc == 143 and "not requeueing" in out, (log, out)


def test_after_the_warning_only_a_preemption_checkpoint_is_requeued(tmp_path):
    """The step stops after the warning: requeued when rank 0 says it saved a checkpoint to resume from; not when
    the run diverged at that step (a requeue would only diverge again), nor for PPO (it cannot resume: its script
    never requeues)."""
    import signal as sig

    rc, log, out = _run_script_with_fake_slurm(tmp_path / "p", [("batch", sig.SIGUSR1)], fake="preempt")
    assert rc == 0 and "scontrol requeue 7" in log and "requeueing job 7 to resume" in out, (log, out)
    assert not list((tmp_path / "p" / "slurm").iterdir()), "the exit file is read and removed"
    rc, log, out = _run_script_with_fake_slurm(tmp_path / "d", [("batch", sig.SIGUSR1)], fake="diverge")
    assert rc == 1 and not any("requeue" in line for line in log) and "without a checkpoint to resume" in out
    rc, log, out = _run_script_with_fake_slurm(tmp_path / "ppo", [("batch", sig.SIGUSR1), ("batch", sig.SIGTERM),
                                                                   ("step", sig.SIGTERM)], recipe="ppo_tiny")
    assert not any("requeue" in line for line in log) and "MAX_REQUEUES=0" in (tmp_path / "ppo" / "job.sh").read_text()
    assert "#SBATCH --requeue" not in (tmp_path / "ppo" / "job.sh").read_text()


def test_srun_tasks_without_a_launcher_are_refused():
    """`srun --ntasks-per-node=8 python launcher/run.py` would start 8 one-process runs writing one output_dir."""
    from launcher.dist import DistEnv, refuse_bare_srun_tasks

    step = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9"}
    with pytest.raises(UserError, match=r"one of 8 srun tasks, but no launcher started it .*--ntasks-per-node=1"):
        refuse_bare_srun_tasks(DistEnv(), {**step, "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"})
    refuse_bare_srun_tasks(DistEnv(), {**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "16"})  # srun -n 1
    refuse_bare_srun_tasks(DistEnv(world_size=16, launched=True), {**step, "SLURM_STEP_NUM_TASKS": "2"})  # torchrun
    refuse_bare_srun_tasks(DistEnv(), {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "9"})  # the batch shell, not a step
    refuse_bare_srun_tasks(DistEnv(), {**step, "SLURM_STEP_NUM_TASKS": "8", "SLURM_PTY_PORT": "40000"})  # --pty bash


def test_cli_exit_code_for_bad_input(capsys):
    from launcher.cli import main

    assert main(["slurm", "--recipe", "lora_tiny", "--nodes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--nodes" in err and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_scripts_match_the_renderer(name):
    path = REPO / "slurm" / name
    assert path.read_text() == render_shipped(**SHIPPED[name]), (
        f"slurm/{name} is stale: regenerate with `python -m launcher.slurm --regenerate`")


# ---------------------------------------------------------------------------------------------------- cluster
@pytest.fixture
def cluster(slurm_cluster):
    return slurm_cluster


def test_missing_slurm_skips_with_reason_or_fails_in_ci(monkeypatch):
    import slurm_cluster as sc

    monkeypatch.setattr(sc, "missing_requirements", lambda: "Slurm/munge not installed (test)")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        sc.slurm_cluster_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        sc.slurm_cluster_or_skip()


@pytest.fixture
def cpu_env():
    # What the rank processes need on this CPU machine; sbatch exports the submitting environment.
    return {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}


def _log(cluster: SlurmCluster, job: str) -> str:
    path = cluster.root / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _tails(log: str, chars: int = 2500) -> str:
    """The end of each srun task's output (lines prefixed `N: `), then the rest: a failing rank's own error is
    otherwise pushed out of the message by the other ranks' shutdown noise."""
    tasks = {}
    for line in log.splitlines():
        head = line.split(":", 1)[0]
        tasks.setdefault(head if head.isdigit() else "-", []).append(line)
    return "\n".join(f"---- task {k} ----\n" + "\n".join(v)[-chars:] for k, v in sorted(tasks.items()))


def _submit(cluster, script, cpu_env):
    res = cluster.sbatch(script, env=cpu_env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_cluster_runs_a_trivial_two_node_job(cluster):
    script = ("#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1 --gres=gpu:2\n"
              f"#SBATCH --output={cluster.root}/job-%j.out\n"
              "set -e\nsrun bash -c 'echo task $SLURM_NODEID of $SLURM_NNODES on $SLURMD_NODENAME "
              "gpus $CUDA_VISIBLE_DEVICES'\n")
    job = _submit(cluster, script, {})
    assert cluster.wait(job, timeout_s=60) == "COMPLETED", _log(cluster, job)
    log = _log(cluster, job)
    # One task per node, and the step sees all of the node's GPUs (the templates' torchrun relies on both).
    assert f"task 0 of 2 on {cluster.nodes[0]} gpus 0,1" in log and f"task 1 of 2 on {cluster.nodes[1]} gpus 0,1" \
        in log, log


@pytest.mark.slurm
@pytest.mark.parametrize("nodes,gpus,message", [(3, 1, "Node count specification invalid"),
                                                 (1, 5, "Requested node configuration is not available")])
def test_impossible_request_fails_fast_with_slurms_message(cluster, nodes, gpus, message):
    script = render_sbatch("lora_tiny", nodes, gpus, "00:10:00", output=f"{cluster.root}/job-%j.out", cpus_per_task=1)
    t0 = time.time()
    res = cluster.sbatch(script)
    assert res.returncode != 0 and message in res.stderr, (res.returncode, res.stdout, res.stderr)
    assert time.time() - t0 < 10


def _lora_script(cluster, out: Path, steps: int, extra=()) -> str:
    return render_sbatch("lora_tiny", 2, 0, "00:30:00", None,
                         [f"training.max_steps={steps}", "data.num_examples=200", "eval.num_examples=4",
                          f"output_dir={out}", *extra], output=f"{cluster.root}/job-%j.out")


@pytest.mark.slurm
@pytest.mark.slow
def test_two_nodes_train_lora_tiny_to_the_end(cluster, cpu_env, tmp_path):
    out = tmp_path / "run"
    job = _submit(cluster, _lora_script(cluster, out, 6), cpu_env)
    t0 = time.time()
    state = cluster.wait(job, timeout_s=240)
    log = _log(cluster, job)
    print(f"2-node lora_tiny job: {state} in {time.time() - t0:.1f} s")
    assert state == "COMPLETED", _tails(log)
    assert "ftlaunch: training finished" in log
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["step"] == 6
    assert manifest["world_size"] == 2
    assert manifest["metrics"]["world_size"] == 2, "the trainer itself must see both ranks (CPU-FACTS trap)"


STEP_RE = re.compile(r"^\d+:\s+step (\d+)/(\d+)", re.M)


@pytest.mark.slurm
@pytest.mark.slow
def test_warning_signal_checkpoints_requeues_and_resumes(cluster, cpu_env, tmp_path):
    out, steps, k = tmp_path / "run", 40, 3
    # No periodic checkpoints: the only one is the preemption's, so the resumed run must start from it.
    job = _submit(cluster, _lora_script(cluster, out, steps, ["training.logging_steps=1", "training.save_steps=1000"]),
                  cpu_env)
    deadline = time.time() + 200
    while True:
        seen = [int(s) for s, _ in STEP_RE.findall(_log(cluster, job))]
        if seen and max(seen) >= k:
            break
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, _log(cluster, job)[-4000:])
        assert time.time() < deadline, "training never reached step k: " + _log(cluster, job)[-4000:]
        time.sleep(0.2)
    signalled_at = max(seen)
    # What Slurm does at --signal=B:USR1@S before the limit: signal the batch shell only.
    res = cluster.run(["scancel", "--signal=USR1", "--batch", job], check=False)
    assert res.returncode == 0, res.stderr

    # The job requeues itself; a requeued job waits for its BeginTime (~2 min): release it.
    deadline = time.time() + 120
    while True:
        info = cluster.job(job)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1:
            break
        assert info.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None), (info, _log(cluster, job)[-4000:])
        assert time.time() < deadline, f"not requeued: {info}\n" + _log(cluster, job)[-4000:]
        time.sleep(0.3)
    cluster.release_requeued(job)
    state = cluster.wait(job, timeout_s=240)
    log = _log(cluster, job)
    assert state == "COMPLETED", log[-5000:]

    first, _, second = log.partition("(restart 1)")
    assert second, _tails(log)
    m = re.search(r"preemption requested: saving checkpoint-(\d+)", first)
    assert m, first[-4000:]
    saved = int(m.group(1))
    assert signalled_at <= saved < steps, (signalled_at, saved)
    assert "requeueing job" in first
    trained_first = [int(s) for s, _ in STEP_RE.findall(first)]
    assert max(trained_first) == saved, "no step beyond the checkpoint was trained (and lost) before stopping"
    assert f"resuming from {out / f'checkpoint-{saved}'}" in second
    trained_second = [int(s) for s, _ in STEP_RE.findall(second)]
    assert trained_second[0] == saved + 1, "the resumed run continues right after the saved step"
    assert sorted(trained_first + trained_second) == list(range(1, steps + 1)), "each step trained exactly once"

    assert (out / f"checkpoint-{saved}" / "trainer_state.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["step"] == steps  # same as an uninterrupted run
    assert manifest["metrics"]["world_size"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    final_state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    logged = [h["step"] for h in final_state["log_history"] if "loss" in h]
    assert logged == list(range(1, steps + 1)), logged


# ---------------------------------------------------------------------------------------------------- preflight
def _probe(total_gib, avail_gib, shm_gib):
    g = 1024 ** 3
    return lambda: (int(total_gib * g), int(avail_gib * g), None if shm_gib is None else int(shm_gib * g), 8)


def test_runner_preflight_counts_every_model_the_plan_loads():
    """PPO holds a policy, a reward and a value model (the LoRA reference is the policy itself): 8 ranks x 3 x
    13.5 GB overflow a 200 GiB node that the policy alone (8 x 13.5 GB) would fit, as the planner counts it."""
    from launcher.errors import PreflightError
    from launcher.inventory import parse_spec
    from launcher.planner import ExtraModel, PlanRequest, plan
    from launcher.preflight import at_start
    from launcher.shapes import resolve_shape

    shape, gpus = resolve_shape("llama-2-7b"), parse_spec("8xA100-80GB")
    extras = [ExtraModel("reference", shape), ExtraModel("reward", shape), ExtraModel("value", shape, trainable=True)]
    ppo = plan(PlanRequest(method="lora", seq_len=512, global_batch_size=16, zero_stage=2, generates=True,
                           extra_models=extras), gpus, shape)
    alone = plan(PlanRequest(method="lora", seq_len=512, global_batch_size=16, zero_stage=2), gpus, shape)
    assert at_start(alone, rank=0, local_rank=0, world_size=1, ranks_per_node=8, probe=_probe(200, 190, 32)).ok
    with pytest.raises(PreflightError, match="200.0 GiB in all"):
        at_start(ppo, rank=0, local_rank=0, world_size=1, ranks_per_node=8, probe=_probe(200, 190, 32))


def test_preflight_host_checks_warn_and_fail_only_when_impossible():
    from launcher.preflight import check_host

    g = 1024 ** 3
    small_shm = check_host(1, None, probe=_probe(64, 60, 0.0625))
    assert small_shm.ok and "--shm-size" in small_shm.warnings[0]
    tight = check_host(8, 14 * g, probe=_probe(200, 100, 32))  # 8 ranks x 14 GiB = 112 GiB > 90% of 100 available
    assert tight.ok and any("112.0 GiB" in w and "OOM" in w for w in tight.warnings)
    impossible = check_host(8, 14 * g, probe=_probe(64, 60, 32))
    assert not impossible.ok and "64.0 GiB in all" in impossible.errors[0]
    fine = check_host(2, 1 * g, probe=_probe(64, 60, 32))
    assert fine.ok and not fine.warnings


def test_runner_preflight_refuses_a_node_that_cannot_load_the_model(capsys):
    """At start, before the model loads: 8 ranks of a node each loading 13.5 GB of Llama-2-7B weights (no ZeRO-3)
    do not fit a 64 GiB node; a CPU run is not host-checked (the planner already counted its RAM)."""
    from launcher.errors import PreflightError
    from launcher.inventory import parse_spec
    from launcher.planner import PlanRequest, plan
    from launcher.preflight import at_start
    from launcher.shapes import resolve_shape

    gpu = plan(PlanRequest(method="lora", seq_len=1024, global_batch_size=16, zero_stage=2), parse_spec("8xA100-80GB"),
               resolve_shape("llama-2-7b"))
    with pytest.raises(PreflightError, match="64.0 GiB in all: it will run out of memory while loading"):
        at_start(gpu, rank=0, local_rank=0, world_size=1, ranks_per_node=8, probe=_probe(64, 60, 32))
    assert at_start(gpu, rank=0, local_rank=0, world_size=1, ranks_per_node=8, probe=_probe(512, 500, 32)).ok
    at_start(gpu, rank=0, local_rank=0, world_size=1, ranks_per_node=1, probe=_probe(64, 60, 0.0625))
    assert "--shm-size" in capsys.readouterr().err
    cpu = plan(PlanRequest(method="lora", seq_len=32, global_batch_size=16), parse_spec("cpu"), resolve_shape("tiny"))
    assert at_start(cpu, rank=0, local_rank=0, world_size=1, ranks_per_node=1, probe=_probe(1, 1, 0.01)).ok


def test_preflight_names_the_node_that_does_not_answer():
    import socket

    from launcher.preflight import check_allreduce

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    t0 = time.time()
    report = check_allreduce(timeout_s=2, env=env)
    assert time.time() - t0 < 15
    assert not report.ok and "rank 1 (node gpu08)" in report.errors[0] and "unreachable node(s): gpu08" in \
        report.errors[0]


def test_check_command_single_process(capsys):
    from launcher.preflight import cmd_check

    assert cmd_check(["--recipe", "lora_tiny", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert "single process" in out and "ok" in out
    with pytest.raises(UserError):
        cmd_check(["--timeout", "0"])


def test_check_command_sizes_the_load_like_the_run():
    """`ftlaunch check --recipe` sizes host RAM from the plan a run here would make, as the run's own start-up
    check does: PPO loads four models (policy, reference, reward, value), not the policy alone."""
    from launcher import memory as mem
    from launcher.config import load_recipe
    from launcher.planner import plan
    from launcher.preflight import _model_load_bytes
    from launcher.shapes import resolve_shape
    from launcher.train import DistEnv, plan_inputs

    inputs = plan_inputs(load_recipe("ppo_tiny", None, []), DistEnv())
    run_plan = plan(inputs.request, inputs.inventory)
    assert _model_load_bytes("ppo_tiny", None, []) == run_plan.load_bytes_per_rank
    policy_only = mem.load_bytes_per_rank(resolve_shape("tiny").num_params, run_plan.zero_stage, False)
    assert len(run_plan.models) >= 3 and run_plan.load_bytes_per_rank > 2 * policy_only


@pytest.mark.slurm
def test_check_across_two_nodes_with_srun(cluster, cpu_env):
    import sys

    script = ("#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1\n"
              f"#SBATCH --output={cluster.root}/job-%j.out\n#SBATCH --chdir={REPO}\n"
              f"set -e\nsrun {sys.executable} -m launcher.preflight --timeout 60 --recipe lora_tiny\n")
    job = _submit(cluster, script, cpu_env)
    state = cluster.wait(job, timeout_s=120)
    log = _log(cluster, job)
    assert state == "COMPLETED", log[-3000:]
    assert "all-reduce across 2 ranks ok" in log and log.count("ftlaunch check: ok") == 2, log[-3000:]
