"""Kill-and-resume bench: a 2-rank ZeRO-2 CPU run is SIGKILLed at random steps (the whole `deepspeed` launcher
process group), resumed with `--resume auto` each time, and its final weights are compared with an uninterrupted run
of the same seed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/resume.py --kills 10 --steps 24 [--seed 1] [--keep-dir /tmp/bench]

Kill points alternate between "the checkpoint directory just appeared" (usually mid-save: tests that a half-written
checkpoint is skipped) and "the checkpoint is marked complete, plus a random delay". tests/test_resume.py reuses
`reference_run` / `killed_run` / `compare_weights` from here.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.checkpoints import MARKER, checkpoints, newest_complete_checkpoint, step_of  # noqa: E402

# 240 training rows = 15 whole global batches an epoch: no partial last batch, which a different rank count would
# fill differently (tests/test_resume.py resumes a 16-step run's checkpoint-8 on one rank).
BASE = ["--recipe", "lora_tiny", "plan.zero_stage=2", "training.save_steps=1", "data.num_examples=256",
        "eval.num_examples=1", "plan.global_batch_size=16", "training.logging_steps=4", "data.eval_ratio=0.0625",
        "training.warmup_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out: Path, steps: int, ranks: int, extra: list[str], base: list[str] = BASE) -> list[str]:
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
                "--master_port", str(_free_port())]
    return [*launcher, str(REPO / "launcher" / "run.py"), *base, f"training.max_steps={steps}", f"output_dir={out}",
            *extra]


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu", **(extra or {})}


def launch(out: Path, steps: int, ranks: int = 2, extra: list[str] = (), log: Path | None = None,
           env: dict | None = None, base: list[str] = BASE) -> subprocess.Popen:
    log = log or out.parent / f"{out.name}.log"
    handle = open(log, "a")
    return subprocess.Popen(_command(out, steps, ranks, list(extra), base), cwd=REPO, env=_env(env), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)  # own process group: kill it whole


def _port_clash(log: Path, since: int) -> bool:
    """The rendezvous port was taken between picking it and binding it (busy shared machines): launch again."""
    with open(log, "rb") as f:
        f.seek(since)
        return b"EADDRINUSE" in f.read()


def run_to_end(out: Path, steps: int, ranks: int = 2, extra: list[str] = (), timeout: float = 600,
               base: list[str] = BASE) -> tuple[int, str]:
    log = out.parent / f"{out.name}.log"
    for _attempt in range(3):
        since = log.stat().st_size if log.exists() else 0
        proc = launch(out, steps, ranks, extra, log, base=base)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = -9
        if rc == 0 or not _port_clash(log, since):
            break
    return rc, log.read_text()


def reference_run(out: Path, steps: int) -> tuple[int, str]:
    return run_to_end(out, steps)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_and_kill(proc: subprocess.Popen, out: Path, step: int, mode: str, rng: random.Random,
                  timeout: float = 600) -> str:
    """Kill the launcher's process group once checkpoint-`step` appears (`dir`) or is marked complete (`marked`).

    The previous kill may have landed a step or two late: the target moves past the newest complete checkpoint, and
    an unfinished checkpoint-`step` left by the previous kill only counts once the resumed run has removed it and
    written it again."""
    newest = newest_complete_checkpoint(out)
    if newest is not None and step_of(newest) >= step:
        step = step_of(newest) + 1
    target = out / f"checkpoint-{step}"
    stale = target.exists()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return f"exited {proc.returncode} before step {step}"
        if stale:
            stale = target.exists()
        elif target.is_dir() and (mode == "dir" or (target / MARKER).exists()):
            if mode == "marked":
                time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next step or two
            complete = (target / MARKER).exists()
            _kill_group(proc)
            return f"killed at checkpoint-{step} ({mode}; marker {'present' if complete else 'absent'})"
        time.sleep(0.005)
    _kill_group(proc)
    return f"timed out waiting for checkpoint-{step}"


def killed_run(out: Path, steps: int, kill_steps: list[int], seed: int = 0, timeout: float = 600) -> dict:
    """Run, SIGKILL at each of `kill_steps` (ascending), resume each time, then let it finish. Returns a report."""
    rng = random.Random(seed)
    log = out.parent / f"{out.name}.log"
    events = []
    for i, step in enumerate(kill_steps):
        mode = "dir" if i % 2 == 0 else "marked"
        for _attempt in range(3):
            since = log.stat().st_size if log.exists() else 0
            proc = launch(out, steps, log=log)
            event = wait_and_kill(proc, out, step, mode, rng, timeout)
            if not (event.startswith("exited") and _port_clash(log, since)):
                break
        events.append(event)
        events[-1] += f"; on disk: {[p.name + ('+' if (p / MARKER).exists() else '-') for p in checkpoints(out)]}"
    rc, text = run_to_end(out, steps, timeout=timeout)
    return {"events": events, "rc": rc, "log": text}


def compare_weights(a: Path, b: Path) -> float:
    """Max absolute difference between two safetensors files (0.0: bitwise equal)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), (sorted(x), sorted(y))
    worst = 0.0
    for k in x:
        if not torch.equal(x[k], y[k]):
            worst = max(worst, (x[k].float() - y[k].float()).abs().max().item())
            worst = worst or float.fromhex("0x1p-149")  # differ only in NaN/sign-of-zero: still not bitwise
    return worst


def loss_history(out: Path) -> list[tuple[int, float]]:
    final = checkpoints(out)[-1] / "trainer_state.json"
    return [(h["step"], h["loss"]) for h in json.loads(final.read_text())["log_history"] if "loss" in h]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-dir", default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    # Kills can land a few steps late and push later targets along: keep them out of the last quarter.
    span = range(2, max(3, args.steps * 3 // 4))
    kill_steps = sorted(rng.sample(span, min(args.kills, len(span))))
    if args.keep_dir:
        root = Path(args.keep_dir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        from bench import common

        root = Path(common.scratch_dir("ftlaunch-resume-"))
    print(f"seed {seed}; kill steps {kill_steps}; dir {root}" + ("" if args.keep_dir else " (removed at exit)"))
    t0 = time.time()
    rc, text = reference_run(root / "ref", args.steps)
    assert rc == 0, text[-3000:]
    t1 = time.time()
    report = killed_run(root / "killed", args.steps, kill_steps, seed)
    t2 = time.time()
    for e in report["events"]:
        print("  " + e)
    assert report["rc"] == 0, report["log"][-3000:]
    weights = "adapter_model.safetensors"
    diff = compare_weights(root / "ref" / weights, root / "killed" / weights)
    same_losses = loss_history(root / "ref") == loss_history(root / "killed")
    print(f"reference {t1 - t0:.0f}s; killed+resumed x{len(kill_steps)} {t2 - t1:.0f}s")
    print(f"final weights max |diff| = {diff} ({'bitwise equal' if diff == 0 else 'NOT bitwise equal'}); "
          f"per-step loss history identical: {same_losses}")
    return 0 if diff == 0 and same_losses else 1


if __name__ == "__main__":
    sys.exit(main())
