"""The ranks of a launched run: who this process is (DistEnv), joining and leaving the process group, agreeing on
what each rank measured before they plan, and ending a rank's process."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by deepspeed/torchrun/srun launcher: train through the DeepSpeed engine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, local_rank_arg: int | None = None) -> "DistEnv":
        launched = "LOCAL_RANK" in os.environ or local_rank_arg is not None
        return cls(rank=int(os.environ.get("RANK", 0)),
                   local_rank=int(os.environ.get("LOCAL_RANK", local_rank_arg or 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)), launched=launched)


def join_process_group(env: DistEnv) -> None:
    """Every launched rank joins the process group first, before it plans: the ranks agree on what they measured
    (`agree_on_inventory`) so that they plan alike, and ZeRO-3's zero.Init (inside from_pretrained) sizes its
    partitions from deepspeed.comm, which the HF Trainer sets up only later when ranks are CPUs (use_cpu=True takes
    accelerate's path), so zero.Init would otherwise see a world of one and fail its batch check. If
    torch.distributed is already up, DeepSpeed just wraps it."""
    if not env.launched:
        return
    import deepspeed
    import torch

    if torch.cuda.is_available():  # object collectives over NCCL use the current device: one GPU per rank
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed()
    release_cpu_allreduce_buffer(env.rank)


def _ranks() -> int:
    """Ranks in this process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree_on_inventory(inventory):
    """The inventory every rank plans from: each rank's own measurements (free GPU memory, the node's available
    host RAM, /dev/shm, cores), the tightest of them all. Measured live, they differ between ranks and nodes, and
    between moments; ranks planning apart (ZeRO-2 here, ZeRO-3 there; another micro-batch) would hang or fail in
    their first collective. A no-op without a process group of more than one rank."""
    import torch.distributed as dist

    if _ranks() == 1:
        return inventory
    from dataclasses import replace

    from launcher.inventory import slowest_gpu

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, inventory)
    least = lambda name: min((v for v in (getattr(i, name) for i in every) if v is not None), default=None)  # noqa
    gpus = [i.gpu for i in every if i.gpu is not None]
    agreed = replace(inventory, gpu=slowest_gpu(gpus) if gpus else None, host_ram_bytes=least("host_ram_bytes"),
                     host_free_bytes=least("host_free_bytes"), shm_bytes=least("shm_bytes"),
                     cpu_count=least("cpu_count"), notes=list(inventory.notes))
    if agreed.capacity_per_rank != inventory.capacity_per_rank or agreed.host_free_bytes != inventory.host_free_bytes:
        agreed.notes.append(f"planned for the tightest of the {len(every)} ranks' measurements (free memory, "
                            f"available host RAM), so that every rank plans alike")
    return agreed


def rank0s(value):
    """Rank 0's `value` on every rank (what only rank 0 found out, e.g. that output_dir is taken); `value` itself
    without a process group of more than one rank."""
    import torch.distributed as dist

    if _ranks() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refuse_bare_srun_tasks(env: DistEnv, environ=os.environ) -> None:
    """`srun --ntasks-per-node=G python launcher/run.py` without a launcher would start G separate one-process runs
    that all write one output_dir; ftlaunch's Slurm scripts start one task per node that runs torchrun."""
    from launcher.errors import UserError

    tasks = environ.get("SLURM_STEP_NUM_TASKS") or "1"  # srun sets it in each task of its step
    interactive = environ.get("SLURM_PTY_PORT") is not None  # `srun --pty bash` in an allocation of many tasks
    if not env.launched and not interactive and tasks.isdigit() and int(tasks) > 1:
        raise UserError(f"this is one of {tasks} srun tasks, but no launcher started it (no LOCAL_RANK): each "
                        f"would train alone; run one task per node that starts the node's ranks (`srun "
                        f"--ntasks-per-node=1 python -m torch.distributed.run ... launcher/run.py`, what `ftlaunch "
                        f"slurm` writes), or one task (srun -n 1) for one process")


def leave_process_group() -> None:
    """Each rank leaves the process group itself once its run has returned. Left to interpreter teardown, gloo's
    worker threads can outlive the objects they use, and a rank that finished its work aborts ("terminate called
    without an active exception", exit -6; pytorch/pytorch#190489): seen once in CI after a complete ZeRO-3 run,
    reproduced here by a bare gloo all-gather then exit. Not after an unexpected exception: this rank may
    have work queued on a collective, and leaving waits for it; that process fails anyway."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int):
    """End a rank's process (launcher/run.py) without the interpreter's object teardown. Leaving the process group
    was not enough: a finished rank still aborted now and then at exit ("terminate called without an active
    exception", -6: rank 1 of a 2-rank ZeRO-2 run in CI, after its summary), as C++ parts of torch.distributed that
    outlive the run are destroyed during finalization (pytorch/pytorch#179291 describes gloo work holding Python
    tensors). The exit handlers still run first, as at a normal exit: logging, file locks, temp-file finalizers."""
    import atexit

    atexit._run_exitfuncs()  # what a normal exit runs before teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def release_cpu_allreduce_buffer(rank: int, shm_dir: Path = Path("/dev/shm")) -> None:
    """DeepSpeed's CPU backend creates one 64 MiB /dev/shm segment per rank for its shared-memory all-reduce
    (deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>) and never unlinks it: every CPU run left
    2 x 67 MB of RAM behind in /dev/shm, until the machine ran short. Its initialisation returns only once this
    rank has mapped every other rank's segment, so after a barrier no one needs the names: each rank unlinks its
    own (the mappings stay valid until the process exits, however it exits)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    if not (shm_dir / name).exists():
        return  # not a CPU run, or not all ranks on one node (DeepSpeed then uses no shm)
    from launcher.preempt import barrier

    barrier()
    (shm_dir / name).unlink(missing_ok=True)
