"""Pre-flight checks: can every rank reach every other, and will this node survive loading the model?

    ftlaunch check [--recipe R] [--timeout 60]            # one process: host checks only
    srun --ntasks-per-node=1 ftlaunch check --recipe R     # every node: host checks + all-reduce across nodes
    torchrun ... / deepspeed ... launcher/run.py ...       # the runner calls at_start() on every rank

`preflight(timeout_s)` runs on every rank: it all-reduces one tensor over torch.distributed with a
timeout (a gloo group, so it works beside NCCL) and names the node that did not answer; rank 0 of each node checks
/dev/shm and host RAM against ranks-per-node x the bytes each rank loads at once (a known cause of host OOM).
Problems that make a run clearly impossible are errors; everything else is a warning.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping, Optional

from launcher.errors import ArgParser, PreflightError, UserError
from launcher.inventory import _local_world_size

GiB = 1024 ** 3
MAX_TIMEOUT_S = 86400  # a day: a check that waits longer is a typo (an inf would never report the missing rank)
MIN_SHM_BYTES = 1 * GiB  # NCCL and DataLoader workers share memory through /dev/shm; Docker's default is 64 MiB
SINGLE_PROCESS = ("single process: nothing to all-reduce (run under srun/torchrun/deepspeed to check the connections "
                  "between ranks)")
PREFLIGHT_PORT_OFFSET = 1  # `ftlaunch check` under srun: the training job's port + 1, so both never collide


@dataclass
class PreflightReport:
    rank: int = 0
    world_size: int = 1
    host: str = field(default_factory=socket.gethostname)
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    allreduce_s: Optional[float] = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        prefix = f"[{self.host} rank {self.rank}/{self.world_size}]"
        return ([f"{prefix} error: {e}" for e in self.errors] + [f"{prefix} warning: {w}" for w in self.warnings]
                + [f"{prefix} {n}" for n in self.notes])


# ---------------------------------------------------------------------------------------------------- host checks
def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def check_host(ranks_per_node: int = 1, load_bytes_per_rank: Optional[int] = None, report: Optional[PreflightReport]
               = None, probe=None) -> PreflightReport:
    """/dev/shm size and host RAM against `ranks_per_node` ranks each loading `load_bytes_per_rank` at once."""
    from launcher.inventory import probe_host

    report = report or PreflightReport()
    total, available, shm, _cpus = (probe or probe_host)()
    if shm is None:
        report.warnings.append("/dev/shm not found: NCCL and DataLoader workers need shared memory")
    elif shm < MIN_SHM_BYTES:
        report.warnings.append(f"/dev/shm is only {shm / 2**20:.0f} MiB (< {MIN_SHM_BYTES / GiB:.0f} GiB): NCCL and "
                               f"DataLoader workers may fail with bus errors; in Docker use --shm-size=16g or --ipc=host")
    else:
        report.notes.append(f"/dev/shm {shm / GiB:.1f} GiB")
    if load_bytes_per_rank and total:
        need = ranks_per_node * load_bytes_per_rank
        avail = available if available is not None else total
        what = (f"{ranks_per_node} rank(s) x {_size(load_bytes_per_rank)} loaded at once = "
                f"{_size(need)} of host RAM")
        if need > total:
            report.errors.append(f"{what}, but this node has {total / GiB:.1f} GiB in all: it will run out of memory "
                                 f"while loading (use ZeRO-3 with zero.Init, fewer ranks per node, or a bigger node)")
        elif need > 0.9 * avail:
            report.warnings.append(f"{what}, but only {avail / GiB:.1f} GiB is available now "
                                   f"({total / GiB:.1f} GiB total): loading may hit the OOM killer")
        else:
            report.notes.append(f"{what}; {avail / GiB:.1f} GiB available")
    elif total:
        report.notes.append(f"host RAM {total / GiB:.1f} GiB, {(available or 0) / GiB:.1f} GiB available")
    return report


# ---------------------------------------------------------------------------------------------------- all-reduce
def _expected_hosts(env: Mapping[str, str], world_size: int) -> list[Optional[str]]:
    """Best guess of each rank's host: Slurm's node list with ranks laid out node by node."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return [None] * world_size
    try:
        from launcher.nodelist import expand_nodelist

        hosts = expand_nodelist(nodelist)
    except Exception:  # noqa: BLE001 - a best-effort label only
        return [None] * world_size
    if not hosts:
        return [None] * world_size
    per_node = max(1, -(-world_size // len(hosts)))
    return [hosts[min(r // per_node, len(hosts) - 1)] for r in range(world_size)]


def _describe_missing(missing: list[int], hosts_seen: dict, expected: list[Optional[str]]) -> str:
    parts = []
    for r in missing:
        host = expected[r] if r < len(expected) else None
        parts.append(f"rank {r}" + (f" (node {host})" if host else ""))
    nodes = sorted({expected[r] for r in missing if r < len(expected) and expected[r]})
    text = ", ".join(parts)
    if nodes:
        text += f"; unreachable node(s): {', '.join(nodes)}"
    if hosts_seen:
        text += f"; answered: {', '.join(f'{r}@{h}' for r, h in sorted(hosts_seen.items()))}"
    return text


def dist_env(env: Mapping[str, str] = os.environ) -> tuple[int, int, int, Optional[str], Optional[int]]:
    """(rank, world size, local rank, master address, master port) from torchrun/deepspeed env or Slurm's srun."""
    if env.get("WORLD_SIZE"):
        port = env.get("MASTER_PORT")
        return (int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                env.get("MASTER_ADDR"), int(port) if port else None)
    if env.get("SLURM_NTASKS") and env.get("SLURM_PROCID") and env.get("SLURM_STEP_ID") is not None:
        from launcher.nodelist import expand_nodelist
        from launcher.slurm import BASE_PORT, PORT_RANGE  # the sbatch scripts' MASTER_PORT rule

        hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        job = int(env.get("SLURM_JOB_ID", "0"))
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else BASE_PORT + job % PORT_RANGE + PREFLIGHT_PORT_OFFSET
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                env.get("MASTER_ADDR") or (hosts[0] if hosts else None), port)
    return 0, 1, 0, None, None


def check_allreduce(timeout_s: float = 60.0, env: Mapping[str, str] = os.environ,
                    report: Optional[PreflightReport] = None) -> PreflightReport:
    """All ranks all-reduce (SUM of ones) within `timeout_s`; on a timeout the error names the missing rank/node.

    Uses the existing process group when torch.distributed is initialised (adding a gloo group for the check),
    otherwise joins one itself from the launcher's (or srun's) environment and leaves it again.
    """
    import torch
    import torch.distributed as dist

    rank, world, _local, addr, port = dist_env(env)
    report = report or PreflightReport(rank=rank, world_size=world)
    report.rank, report.world_size = rank, world
    timeout = timedelta(seconds=timeout_s)
    created = False
    store = None
    expected = _expected_hosts(env, world)
    t0 = time.time()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        report.rank, report.world_size = rank, world
        group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    else:
        if world == 1:
            report.notes.append(SINGLE_PROCESS)
            return report
        if not addr or not port:
            report.errors.append("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not: cannot rendezvous")
            return report
        # Under torchrun the agent already serves the store on MASTER_PORT: connect to it as a client.
        host_store = rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
        try:
            store = dist.TCPStore(addr, port, world, is_master=host_store, timeout=timeout,
                                  wait_for_workers=False)
        except Exception as e:  # noqa: BLE001
            where = f"the master {addr}:{port}" + (f" (node {expected[0]})" if expected[0] else "")
            report.errors.append(f"rank {rank} could not reach {where} within {timeout_s:.0f} s: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return report
        store.set(f"preflight/host/{rank}", socket.gethostname())
        # Rank 0 knows who joined: wait for everyone's key, and name those who never came.
        if rank == 0:
            missing = _wait_keys(store, world, timeout_s)
            if missing:
                seen = {r: store.get(f"preflight/host/{r}").decode() for r in range(world) if r not in missing}
                store.set("preflight/abort", _describe_missing(missing, seen, expected))
                report.errors.append(f"no answer within {timeout_s:.0f} s from " +
                                     _describe_missing(missing, seen, expected))
                # Keep the store up until the ranks that did come have read why (they ack), at most 10 s.
                acks = [f"preflight/ack/{r}" for r in seen if r != 0]
                deadline = time.time() + 10
                while acks and time.time() < deadline and not store.check(acks):
                    time.sleep(0.1)
                return report
            store.set("preflight/abort", "")
        else:
            try:
                store.wait(["preflight/abort"], timeout)
                why = store.get("preflight/abort").decode()
                store.set(f"preflight/ack/{rank}", "1")
            except Exception:  # noqa: BLE001
                why = "rank 0 did not say which rank is missing"
            if why:
                report.errors.append(f"rank 0 gave up waiting for the others; no answer from {why}")
                return report
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        created = True
        group = None
    try:
        t = torch.ones(1)
        work = dist.all_reduce(t, group=group, async_op=True)
        if not work.wait(timeout):
            raise RuntimeError("timed out")
        if int(t.item()) != world:
            report.errors.append(f"all-reduce returned {int(t.item())}, expected {world}")
        report.allreduce_s = time.time() - t0
        report.notes.append(f"all-reduce across {world} ranks ok ({report.allreduce_s:.2f} s)")
    except Exception as e:  # noqa: BLE001
        report.errors.append(f"all-reduce across {world} ranks failed within {timeout_s:.0f} s: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}" +
                             ("" if expected[0] is None else f" (nodes: {', '.join(sorted(set(filter(None, expected))))})"))
    finally:
        if created:
            dist.destroy_process_group()
    return report


def _wait_keys(store, world: int, timeout_s: float) -> list[int]:
    deadline = time.time() + timeout_s
    missing = list(range(world))
    while missing and time.time() < deadline:
        missing = [r for r in missing if not store.check([f"preflight/host/{r}"])]
        if missing:
            time.sleep(0.1)
    return missing


# ---------------------------------------------------------------------------------------------------- entry points
def preflight(timeout_s: float = 60.0, *, ranks_per_node: Optional[int] = None,
              load_bytes_per_rank: Optional[int] = None, env: Mapping[str, str] = os.environ) -> PreflightReport:
    """`ftlaunch check` on every rank: all-reduce with a timeout (a note when there is one process), then host
    checks on each node's first rank. The report carries errors and warnings; the caller prints them."""
    rank, world, local, _addr, _port = dist_env(env)
    report = PreflightReport(rank=rank, world_size=world)
    if world > 1:
        check_allreduce(timeout_s, env=env, report=report)
    else:  # without importing torch
        report.notes.append(SINGLE_PROCESS)
    if local == 0:
        per_node = ranks_per_node or int(_local_world_size(env) or 1)
        check_host(per_node, load_bytes_per_rank, report)
    return report


def at_start(plan, rank: int, local_rank: int, world_size: int, ranks_per_node: int, timeout_s: float = 60.0,
             probe=None) -> PreflightReport:
    """What the runner checks on every rank before the model loads (`ftlaunch check`, run at start).

    Under a launcher: the all-reduce with a timeout, on the process group the run has just joined. On GPU nodes,
    the first rank of each node: /dev/shm (NCCL) and host RAM against every local rank loading its share of the
    weights at once. (CPU ranks hold the whole run in host RAM, which the planner has already checked.) Warnings
    are printed; errors raise PreflightError, before anything is loaded."""
    report = PreflightReport(rank=rank, world_size=world_size)
    if world_size > 1:
        check_allreduce(timeout_s, report=report)
    if local_rank == 0 and plan.device == "cuda":
        check_host(ranks_per_node, plan.load_bytes_per_rank, report, probe=probe)
    for warning in report.warnings:
        print(f"ftlaunch: warning: {warning}", file=sys.stderr, flush=True)
    if report.errors:
        raise PreflightError("; ".join(report.errors))
    return report


def _model_load_bytes(recipe: Optional[str], config: Optional[str], overrides: list[str]) -> Optional[int]:
    """Bytes of host RAM one rank needs while loading a recipe's models (every model it holds, PPO: four, in its
    load dtype): from the plan a run here would make (shapes, no download), the number the run's own start-up check
    uses; None without a recipe."""
    if not (recipe or config):
        return None
    from launcher.config import load_recipe
    from launcher.planner import plan as plan_memory
    from launcher.train import DistEnv, plan_inputs

    inputs = plan_inputs(load_recipe(recipe, config, overrides), DistEnv.from_env())
    return plan_memory(inputs.request, inputs.inventory).load_bytes_per_rank


def cmd_check(argv: list[str]) -> int:
    p = ArgParser(prog="ftlaunch check", description=(
        "Pre-flight checks: all-reduce across every rank with a timeout (under srun/torchrun/deepspeed), "
        "/dev/shm size, host RAM against ranks-per-node x model size loaded at once."))
    p.add_argument("--recipe", help="size the RAM check for this recipe's model")
    p.add_argument("--config", help="a recipe YAML file of your own")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every rank (default 60)")
    p.add_argument("--ranks-per-node", type=int, help="ranks that will load the model at once on a node "
                                                      "(default: the launcher's local world size, else GPUs seen)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = p.parse_args(argv)
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # nan and inf too: a timedelta of them fails, or never times out
        raise UserError(f"--timeout: must be a number of seconds in (0, {MAX_TIMEOUT_S}], got {args.timeout:g}")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise UserError(f"--ranks-per-node: must be positive, got {args.ranks_per_node}")
    per_node = args.ranks_per_node
    local = _local_world_size(os.environ)
    if per_node is None:
        from launcher.inventory import probe_gpus, slurm_gpus_per_node

        per_node = int(local) if local else (slurm_gpus_per_node(os.environ) or len(probe_gpus()) or 1)
    load = _model_load_bytes(args.recipe, args.config, args.overrides)
    report = preflight(args.timeout, ranks_per_node=per_node, load_bytes_per_rank=load)
    for line in report.lines():
        print(f"ftlaunch check: {line}", file=sys.stderr if ("error:" in line or "warning:" in line) else sys.stdout)
    if report.ok:
        print(f"ftlaunch check: ok{' (with warnings)' if report.warnings else ''}")
        return 0
    return 1


if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from launcher.cli import guarded

    sys.exit(guarded(cmd_check, sys.argv[1:], "--debug" in sys.argv))
