"""PreemptionCallback on a single-process HF Trainer: a SIGUSR1 mid-run stops training at the next step boundary
after saving a complete checkpoint, and the run resumes from it to the same final step."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from launcher.errors import PREEMPTED_EXIT_CODE
from launcher.preempt import PreemptionCallback, any_rank


class TinyRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class SignalAtStep:
    """A step callback that sends this process a signal at the end of step `at` (before PreemptionCallback runs)."""

    def __new__(cls, at, sig=signal.SIGUSR1):
        from transformers import TrainerCallback

        class _Sender(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at:
                    os.kill(os.getpid(), sig)

        return _Sender()


def _trainer(tmp_path, max_steps, callbacks, **extra):
    from transformers import Trainer, TrainingArguments

    settings = {"save_strategy": "no", "logging_steps": 1, **extra}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, **settings)
    torch.manual_seed(0)
    return Trainer(model=TinyRegressor(), args=args, train_dataset=Rows(),
                   eval_dataset=Rows(16) if extra.get("eval_strategy") else None, callbacks=callbacks)


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield saved[signal.SIGUSR1]
    for s, h in saved.items():
        signal.signal(s, h)


def test_sigusr1_saves_checkpoint_and_stops_at_next_step(tmp_path, restore_signals):
    callback = PreemptionCallback()
    assert signal.getsignal(signal.SIGUSR1) == callback._on_signal
    # Sender first, so the signal lands during step 3's on_step_end: the stop must come at step 3, not later.
    trainer = _trainer(tmp_path, 20, [SignalAtStep(3), callback])
    trainer.train()
    assert callback.preempted and callback.step == 3 and callback.signal_name == "SIGUSR1"
    assert trainer.state.global_step == 3
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / "trainer_state.json").is_file(), "the preemption checkpoint must be complete"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 3
    # After a preemption the handlers stay, so a launcher's late SIGTERM cannot kill the rank mid-exit.
    assert signal.getsignal(signal.SIGTERM) == callback._on_signal
    assert PREEMPTED_EXIT_CODE == 143

    # Resume: a fresh trainer picks up at step 3 and finishes at the same final step as an uninterrupted run.
    resumed_cb = PreemptionCallback()
    resumed = _trainer(tmp_path, 20, [resumed_cb])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert not resumed_cb.preempted
    assert resumed.state.global_step == 20
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps == list(range(1, 21)), steps  # steps 1-3 from the checkpoint's history, 4-20 trained now

    # Same weights as an uninterrupted run: no optimizer step lost or repeated.
    straight = _trainer(tmp_path / "straight", 20, [])
    straight.train()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b)


def test_sigterm_is_a_preemption_signal_too(tmp_path, restore_signals):
    callback = PreemptionCallback()
    trainer = _trainer(tmp_path, 10, [SignalAtStep(2, signal.SIGTERM), callback])
    trainer.train()
    assert callback.preempted and callback.step == 2 and callback.signal_name == "SIGTERM"
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()


def test_the_warning_window_goes_to_the_checkpoint_not_evaluation(tmp_path, restore_signals):
    """At the preempted step an evaluation was due (every 3 steps) and the best checkpoint would be reloaded after
    the loop: neither runs; the checkpoint is saved and training stops."""
    from transformers import TrainerCallback

    class Evaluations(TrainerCallback):
        steps: list = []

        def on_evaluate(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    callback, evaluations = PreemptionCallback(), Evaluations()
    trainer = _trainer(tmp_path, 20, [SignalAtStep(6), callback, evaluations], eval_strategy="steps", eval_steps=3,
                       save_strategy="steps", save_steps=3, load_best_model_at_end=True)
    trainer.train()
    assert callback.preempted and trainer.state.global_step == 6
    assert evaluations.steps == [3], evaluations.steps  # step 3 on schedule; none at the preempted step 6
    assert (tmp_path / "out" / "checkpoint-6" / "trainer_state.json").is_file()
    assert not trainer.args.load_best_model_at_end


def test_no_signal_no_preemption(tmp_path, restore_signals):
    callback = PreemptionCallback(signals=(signal.SIGUSR1,))
    trainer = _trainer(tmp_path, 4, [callback])
    trainer.train()
    assert not callback.preempted and callback.step is None
    assert trainer.state.global_step == 4
    assert not any(p.name.startswith("checkpoint-") for p in (tmp_path / "out").iterdir())
    # Handlers restored after a normal end; a late warning is ignored rather than killing the process.
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_IGN, restore_signals)


def test_any_rank_without_distributed_is_identity():
    assert any_rank(True) is True and any_rank(False) is False


def test_request_without_signal(tmp_path, restore_signals):
    callback = PreemptionCallback(install=False)
    callback.request()
    trainer = _trainer(tmp_path, 5, [callback])
    trainer.train()
    assert callback.preempted and callback.step == 1


AGREE_SCRIPT = """
import os, sys, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
from launcher.preempt import any_rank
dist.init_process_group("gloo")
rank = dist.get_rank()
print(any_rank(rank == 1), any_rank(False), flush=True)
dist.destroy_process_group()
"""


def run_two_gloo_ranks(script: str) -> list[str]:
    """`script` in two processes joined by gloo (torch only: no transformers start-up); each rank's stdout."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parent.parent)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "REPO": repo, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return [out for out, _ in outs]


def test_one_ranks_flag_is_shared_with_all_ranks():
    """all-reduce MAX over gloo: rank 1's flag reaches rank 0; no flag anywhere stays False."""
    for out in run_two_gloo_ranks(AGREE_SCRIPT):
        assert out.split() == ["True", "False"], out


INVENTORY_SCRIPT = """
import os, sys, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
from launcher.dist import agree_on_inventory
from launcher.inventory import GpuInfo, Inventory
dist.init_process_group("gloo")
rank, GiB = dist.get_rank(), 2**30
# what two ranks on two nodes measured: rank 1's GPU has less free, rank 0's node less host RAM available
mine = Inventory("slurm", 2, 1, GpuInfo("H100", 80 * GiB, (78 - 3 * rank) * GiB, (9, 0)), host_ram_bytes=512 * GiB,
                 host_free_bytes=(400 + 50 * rank) * GiB, shm_bytes=64 * GiB, cpu_count=32 - rank)
agreed = agree_on_inventory(mine)
print(agreed.gpu.free_bytes // GiB, agreed.host_free_bytes // GiB, agreed.cpu_count, len(agreed.notes), flush=True)
dist.destroy_process_group()
"""


def test_ranks_plan_from_the_tightest_of_their_measurements():
    """Free GPU memory and available host RAM are measured per rank: every rank gets the smallest of each, so
    every rank computes the same plan (ZeRO stage, micro-batch) and none plans for memory another lacks."""
    outs = run_two_gloo_ranks(INVENTORY_SCRIPT)
    assert [out.split() for out in outs] == [["75", "400", "31", "1"]] * 2, outs
