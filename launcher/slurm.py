"""`ftlaunch slurm`: render a ready-to-submit sbatch script for a recipe.

    ftlaunch slurm --recipe qlora_7b --nodes 1 --gpus-per-node 1 > job.sbatch
    ftlaunch slurm --recipe sft_7b --nodes 2 --gpus-per-node 8 --time 12:00:00 -- plan.zero_stage=3 --write x.sbatch

Every `#SBATCH` line holds literal values (Slurm does not expand variables there). The script:
  * runs one `srun` task per node; each task starts `torchrun --nnodes N --node_rank $SLURM_NODEID
    --nproc_per_node G` (static rendezvous: master = first host of SLURM_JOB_NODELIST, port derived from the job id),
    or, for one node with one GPU (or a CPU rank), `python launcher/run.py` directly;
  * asks Slurm for a warning signal before the time limit (`--signal=B:USR1@S`) and forwards it from the batch shell
    to the ranks, which save a checkpoint at the next step boundary and exit with PREEMPTED_EXIT_CODE;
  * then requeues itself (`scontrol requeue`, `--requeue`, `--open-mode=append`); the requeued run resumes from the
    newest complete checkpoint (`--resume auto`, the runner's default).
See slurm/README.md for why torchrun, and for NCCL settings.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Iterable, Optional

from launcher.errors import PREEMPTED_EXIT_CODE, ArgParser, UserError, writable_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = "slurm/%x-%j.out"
DEFAULT_TIME = "04:00:00"
DEFAULT_MAX_REQUEUES = 20
CPUS_PER_GPU = 8
BASE_PORT, PORT_RANGE = 20000, 12000  # 20000-31999: below Linux's ephemeral ports (32768+), which clients take

_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
                      r"|(?P<a>\d+)(?::(?P<b>\d{1,2})(?::(?P<c>\d{1,2}))?)?)$")
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_.+-]+$")  # partition, account, job name, constraint
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./%+@:=,-]+$")  # output path: Slurm's %x %j %A %a patterns allowed
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*=")


def parse_time_limit(text: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> seconds; UserError when malformed or 0."""
    m = _TIME_RE.match(str(text).strip())
    if not m:
        raise UserError(f"--time '{text}': use Slurm's format, e.g. 04:00:00, 90 (minutes) or 1-12:00:00")
    g = {k: int(v) if v is not None else None for k, v in m.groupdict().items()}
    if g["d"] is not None:
        seconds = g["d"] * 86400 + g["dh"] * 3600 + (g["dm"] or 0) * 60 + (g["ds"] or 0)
    elif g["c"] is not None:
        seconds = g["a"] * 3600 + g["b"] * 60 + g["c"]
    elif g["b"] is not None:
        seconds = g["a"] * 60 + g["b"]
    else:
        seconds = g["a"] * 60
    if seconds <= 0:
        raise UserError(f"--time '{text}': the time limit must be positive")
    return seconds


def default_signal_seconds(limit_s: int) -> int:
    """How long before the time limit the warning comes: 5 min, or a quarter of a short limit (at least 30 s).
    Slurm may send it up to 60 s early."""
    return 300 if limit_s >= 1200 else max(30, limit_s // 4)


def _check_word(value: Optional[str], what: str) -> Optional[str]:
    if value is None:
        return None
    if not _SAFE_WORD.match(str(value)):
        raise UserError(f"{what} '{value}': only letters, digits and . _ + - are allowed (no spaces or $VARS: "
                        f"#SBATCH lines are not expanded by the shell)")
    return str(value)


def _positive_int(value, what: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} '{value}': expected a whole number") from None
    if isinstance(value, float) and value != number or number < minimum:
        raise UserError(f"{what} {value}: must be at least {minimum}")
    return number


def render_sbatch(recipe: Optional[str], nodes: int = 1, gpus_per_node: int = 1, time: str = DEFAULT_TIME,
                  partition: Optional[str] = None, extra_overrides: Iterable[str] = (), *,
                  config: Optional[str] = None, output: str = DEFAULT_OUTPUT, job_name: Optional[str] = None,
                  cpus_per_task: Optional[int] = None, mem: Optional[str] = None, account: Optional[str] = None,
                  constraint: Optional[str] = None, exclusive: Optional[bool] = None,
                  signal_seconds: Optional[int] = None, max_requeues: int = DEFAULT_MAX_REQUEUES,
                  workdir: Optional[str] = "auto", python: Optional[str] = None, validate: bool = True) -> str:
    """The text of an sbatch script that trains `recipe` on `nodes` x `gpus_per_node` GPUs.

    gpus_per_node=0 runs one CPU rank per node (gloo; CPU clusters and the tests). `workdir="auto"` pins the job's
    working directory to this checkout (`#SBATCH --chdir=...`); None leaves it to sbatch (the submit directory).
    Under "auto", a --config and the path overrides (config.PATH_KEYS) typed relative to another directory are written as
    absolute paths; paths inside a --config file are read relative to the checkout, as `ftlaunch run` there would.
    `python` is the interpreter on the nodes (default: this one). `validate` loads the recipe with the overrides,
    so typos fail here rather than in the queue. Raises UserError on bad arguments.
    """
    if bool(recipe) == bool(config):
        raise UserError("give exactly one of --recipe NAME or --config FILE")
    nodes = _positive_int(nodes, "--nodes")
    gpus = _positive_int(gpus_per_node, "--gpus-per-node", minimum=0)
    limit_s = parse_time_limit(time)
    partition = _check_word(partition, "--partition")
    account = _check_word(account, "--account")
    constraint = _check_word(constraint, "--constraint")
    job_name = _check_word(job_name or f"ftl-{recipe or Path(config).stem}", "--job-name")
    if not output or not _SAFE_PATH.match(output):
        raise UserError(f"--output '{output}': a path without spaces or $VARS (Slurm patterns like %x %j are fine)")
    if mem is not None and not re.match(r"^\d+[KMGT]?$", str(mem)):
        raise UserError(f"--mem '{mem}': e.g. 64G, 500000M, or 0 for all of the node's memory")
    if cpus_per_task is None:
        cpus_per_task = CPUS_PER_GPU * gpus if gpus else 1
    cpus_per_task = _positive_int(cpus_per_task, "--cpus-per-task")
    if signal_seconds is None:
        signal_seconds = default_signal_seconds(limit_s)
    signal_seconds = _positive_int(signal_seconds, "--signal-seconds")
    if signal_seconds >= limit_s:
        raise UserError(f"--signal-seconds {signal_seconds}: the warning must come before the time limit "
                        f"({time} = {limit_s} s)")
    if signal_seconds > 65535:
        raise UserError(f"--signal-seconds {signal_seconds}: Slurm allows at most 65535")
    max_requeues = _positive_int(max_requeues, "--max-requeues", minimum=0)
    overrides = [str(o) for o in extra_overrides]
    for item in overrides:
        if not _OVERRIDE.match(item) or "\n" in item:
            raise UserError(f"override '{item}': expected dotted key=value, e.g. training.max_steps=100")
    resumes = True
    if validate:  # UserError with did-you-mean on typos, now rather than after the job has queued
        from launcher.config import load_recipe
        from recipes import common

        cfg = load_recipe(recipe, config, overrides)
        common.check_training_section(cfg)  # imports TRL (~5 s)
        resumes = common.resumes(cfg.method)
    if workdir == "auto":
        workdir = str(REPO_ROOT)
        if Path.cwd().resolve() != REPO_ROOT:  # the job starts in the checkout: paths typed here must still hold
            config = str(Path(config).resolve()) if config else None
            from launcher.config import absolute_path, absolute_path_override

            overrides = [absolute_path_override(item) for item in overrides]
            output = output if output == DEFAULT_OUTPUT else absolute_path(output)
    if workdir is not None and not _SAFE_PATH.match(workdir):
        raise UserError(f"working directory '{workdir}': spaces and $ are not supported in #SBATCH --chdir")
    if exclusive is None:  # whole GPU nodes for multi-node runs; never for CPU ranks (it would grant all GRES)
        exclusive = nodes > 1 and gpus > 0

    run_args = ["--recipe", recipe] if recipe else ["--config", config]
    run_args += overrides
    direct = nodes == 1 and gpus <= 1
    ranks = nodes * max(gpus, 1)
    what = f"{nodes} node(s) x {gpus} GPU(s)" if gpus else f"{nodes} node(s) x 1 CPU rank"
    shown_python = python
    python = python or sys.executable
    cli = _cli_args(recipe, config, nodes, gpus, time, partition, output)
    cli += ["--no-chdir"] if workdir is None else []
    cli += ["--python", shown_python] if shown_python else []
    cli += ["--", *overrides] if overrides else []
    command = "ftlaunch slurm " + " ".join(shlex.quote(a) for a in cli)

    sb = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus_per_task}"]
    if gpus:
        sb.append(f"--gres=gpu:{gpus}")
    if mem is not None:
        sb.append(f"--mem={mem}")
    if exclusive:
        sb.append("--exclusive")
    sb.append(f"--time={time}")
    if partition:
        sb.append(f"--partition={partition}")
    if account:
        sb.append(f"--account={account}")
    if constraint:
        sb.append(f"--constraint={constraint}")
    if not resumes:  # a requeue would only start it again from scratch
        max_requeues = 0
    sb += [f"--output={output}", "--open-mode=append", f"--signal=B:USR1@{signal_seconds}"]
    sb += ["--requeue"] if resumes else []
    if workdir:
        sb.append(f"--chdir={workdir}")

    q = shlex.quote
    lines = ["#!/bin/bash",
             f"# {recipe or config} on {what} ({ranks} rank(s)). Generated by: {command}",
             "# Time-limit warning -> checkpoint -> requeue -> resume: see slurm/README.md." if resumes else
             "# This method cannot resume (TRL's trainer has none): at the time-limit warning it stops, saves the model "
             "so far\n# as its result and is not requeued. Give --time the whole run.",
             *(f"#SBATCH {s}" for s in sb),
             "",
             "set -euo pipefail",
             '[ -f launcher/run.py ] || { echo "ftlaunch: run from the ftlaunch checkout (no launcher/run.py in $PWD)" >&2; exit 2; }',
             "",
             f"PYTHON={q(python)}",
             f"RUN_ARGS=({' '.join(q(a) for a in run_args)})",
             f"NNODES={nodes}",
             f"NPROC_PER_NODE={max(gpus, 1)}",
             f"MAX_REQUEUES={max_requeues}",
             "",
             "# One thread per rank unless told otherwise (ranks x threads must not oversubscribe the cores).",
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
             "# torchrun SIGKILLs its ranks 30 s after it gets a TERM (preemption with GraceTime, scancel): give them",
             "# time to finish their checkpoint (not more: after a rank crashes the others wait this long too).",
             f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{min(signal_seconds, 120)}}}",
             "# Rank 0 writes why the run stopped here (`preempted`: a checkpoint to resume from); read after the step.",
             'export FTLAUNCH_EXIT_FILE="$PWD/slurm/.ftl-$SLURM_JOB_ID.exit"',
             'rm -f "$FTLAUNCH_EXIT_FILE"',
             "# Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch by itself.",
             "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}",
             "# NCCL on GPU clusters (see slurm/README.md), e.g.:",
             "#   export NCCL_SOCKET_IFNAME=ib0      # the interface the nodes reach each other on",
             "#   export NCCL_IB_DISABLE=1           # only where there is no InfiniBand",
             "#   export NCCL_DEBUG=WARN             # INFO to debug hangs",
             "",
             "# Rendezvous: the first host of the allocation, a port derived from the job id.",
             'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f"MASTER_PORT=$(( {BASE_PORT} + SLURM_JOB_ID % {PORT_RANGE} ))",
             "export MASTER_ADDR MASTER_PORT",
             'echo "ftlaunch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
             ' master $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"',
             "",
             "# Slurm sends USR1 to this shell (B:) before the time limit: pass it on to the ranks, which checkpoint",
             f"# at the next optimizer step and exit with {PREEMPTED_EXIT_CODE}. TERM (scancel, the limit itself) is",
             "# passed on by Slurm to every process; this shell keeps waiting so the ranks can still save. A TERM",
             "# for the time limit after the warning (a save too slow for the window) requeues at once, as this shell",
             "# may be killed before the step ends; the next start resumes from the newest complete checkpoint.",
             "# (Tried on the test cluster: Slurm requeues a job it is ending for its time limit, and one being",
             "# cancelled too, so a scancel, whose Reason is not TimeLimit, must not.)",
             "warned=0; terminated=0; requeued=0; step_pid=",
             "on_warning() {",
             "    warned=1",
             '    echo "ftlaunch: time-limit warning (USR1): asking the ranks to checkpoint and stop"',
             '    if [ -n "$step_pid" ]; then kill -USR1 "$step_pid" 2>/dev/null || true; fi',
             "}",
             "on_term() {",
             "    terminated=1",
             '    if [ "$warned" -eq 1 ] && [ "$requeued" -eq 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ] &&',
             '       scontrol -o show job "$SLURM_JOB_ID" 2>/dev/null | grep -q "Reason=TimeLimit"; then',
             '        echo "ftlaunch: time limit reached before the ranks stopped; requeueing job $SLURM_JOB_ID now"',
             '        scontrol requeue "$SLURM_JOB_ID" && requeued=1',
             "    fi",
             "}",
             "trap on_warning USR1",
             "trap on_term TERM",
             ""]
    # srun forwards USR1 to every process of the step. The per-node shell ignores it before exec'ing the
    # launcher, so torchrun (which has no USR1 handler) survives; SIG_IGN is inherited by the ranks until the
    # PreemptionCallback installs its handler.
    srun = (f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 --label "
            if not direct else "srun --nodes=1 --ntasks=1 ")
    if direct:
        lines += ["# One process: no launcher needed.",
                  srun + "\\",
                  "    bash -c 'trap \"\" USR1; exec \"$@\"' ftlaunch-rank \\",
                  '    "$PYTHON" launcher/run.py "${RUN_ARGS[@]}" &']
    else:
        lines += ["# One task per node; each starts the node's ranks with torchrun (static rendezvous).",
                  srun + "\\",
                  "    bash -c 'trap \"\" USR1; exec \"$0\" -m torch.distributed.run --node_rank=\"$SLURM_NODEID\" "
                  "\"$@\"' \"$PYTHON\" \\",
                  '    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" '
                  '--master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \\',
                  '    launcher/run.py "${RUN_ARGS[@]}" &']
    lines += ["step_pid=$!",
              "# `wait` returns early when a trapped signal arrives: keep waiting until the step has ended.",
              "while :; do",
              '    rc=0; wait "$step_pid" || rc=$?',
              '    kill -0 "$step_pid" 2>/dev/null || break',
              "done",
              "# the step may have ended just as a signal interrupted `wait` (rc 128+signal): bash kept its status",
              'if [ "$rc" -gt 128 ]; then rc=0; wait "$step_pid" || rc=$?; fi',
              'stopped=$(cat "$FTLAUNCH_EXIT_FILE" 2>/dev/null || true); rm -f "$FTLAUNCH_EXIT_FILE"',
              "",
              'if [ "$rc" -eq 0 ]; then echo "ftlaunch: training finished"; exit 0; fi',
              'if [ "$requeued" -eq 1 ]; then echo "ftlaunch: stopped at the time limit (rc $rc); requeued"; exit 0; fi',
              'if [ "$terminated" -eq 1 ]; then echo "ftlaunch: job terminated (rc $rc); not requeueing"; '
              'exit "$rc"; fi',
              "# Requeue only for a checkpoint taken after our own warning: srun reports 143 too when it kills a node's",
              "# task because another failed, and torchrun reports any rank failure as 1, so exit codes cannot tell.",
              'if [ "$warned" -eq 1 ] && [ "$stopped" != preempted ]; then',
              '    echo "ftlaunch: the run ended after the warning without a checkpoint to resume (exit code $rc); not requeueing" >&2',
              '    exit "$rc"',
              "fi",
              'if [ "$warned" -eq 1 ]; then',
              '    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then',
              '        echo "ftlaunch: stopped for preemption, but already requeued $MAX_REQUEUES times; giving up" >&2',
              '        exit "$rc"',
              "    fi",
              '    echo "ftlaunch: stopped after the warning (exit code $rc); requeueing job $SLURM_JOB_ID to resume"',
              '    scontrol requeue "$SLURM_JOB_ID"',
              "    exit 0",
              "fi",
              'echo "ftlaunch: training failed (exit code $rc)" >&2',
              'exit "$rc"',
              ""]
    return "\n".join(lines)


def _cli_args(recipe, config, nodes, gpus, time, partition, output) -> list[str]:
    args = ["--recipe", recipe] if recipe else ["--config", config]
    args += ["--nodes", str(nodes), "--gpus-per-node", str(gpus), "--time", time]
    if partition:
        args += ["--partition", partition]
    if output != DEFAULT_OUTPUT:
        args += ["--output", output]
    return args


def _parser() -> ArgParser:
    p = ArgParser(
        prog="ftlaunch slurm", description="Render an sbatch script for a recipe (print it, write it, or submit it).",
        epilog="Recipe overrides go after `--`, e.g. `-- training.max_steps=100 output_dir=runs/x`.")
    p.add_argument("--recipe", help="a shipped recipe (see `ftlaunch recipes`)")
    p.add_argument("--config", help="a recipe YAML file of your own")
    p.add_argument("--nodes", default="1", help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", default="1", help="GPUs per node (default 1; 0 = one CPU rank per node)")
    p.add_argument("--time", default=DEFAULT_TIME, help=f"time limit (default {DEFAULT_TIME})")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--output", default=DEFAULT_OUTPUT,  # argparse %-formats help: Slurm's %x %j need %%
                   help=f"job log path (default {DEFAULT_OUTPUT.replace('%', '%%')})")
    p.add_argument("--job-name", help="default ftl-RECIPE")
    p.add_argument("--account")
    p.add_argument("--constraint")
    p.add_argument("--cpus-per-task", help=f"CPUs per node task (default {CPUS_PER_GPU} per GPU)")
    p.add_argument("--mem", help="memory per node, e.g. 256G (default: the partition's)")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="whole nodes (default: on for several nodes)")
    p.add_argument("--signal-seconds", help="warning this many seconds before the time limit (default 300)")
    p.add_argument("--max-requeues", default=str(DEFAULT_MAX_REQUEUES), help="stop requeueing after this many")
    p.add_argument("--python", help="Python on the nodes (default: this interpreter)")
    p.add_argument("--no-chdir", action="store_true", help="no #SBATCH --chdir: run in the submit directory")
    p.add_argument("--write", metavar="FILE", help="write the script to FILE instead of printing it")
    p.add_argument("--submit", action="store_true", help="write it (to --write or slurm/ftl-RECIPE.sbatch) and sbatch it")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    return p


def cmd_slurm(argv: list[str]) -> int:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *extra]
    script = render_sbatch(
        args.recipe, args.nodes, args.gpus_per_node, args.time, args.partition, overrides, config=args.config,
        output=args.output, job_name=args.job_name, cpus_per_task=args.cpus_per_task, mem=args.mem,
        account=args.account, constraint=args.constraint, exclusive=args.exclusive,
        signal_seconds=args.signal_seconds, max_requeues=args.max_requeues,
        workdir=None if args.no_chdir else "auto", python=args.python)
    target = args.write
    if args.submit and not target:
        target = str(REPO_ROOT / "slurm" / f"{args.job_name or 'ftl-' + (args.recipe or Path(args.config).stem)}.sbatch")
    if not target:
        sys.stdout.write(script)
        return 0
    path = Path(target)
    writable_dir(path.parent, "--write")
    try:
        path.write_text(script)
        path.chmod(0o755)
    except OSError as e:
        raise UserError(f"--write {path}: cannot write it ({e.strerror or e})") from None
    print(f"ftlaunch: wrote {path}", file=sys.stderr)
    if args.submit:
        import shutil
        import subprocess

        if shutil.which("sbatch") is None:
            raise UserError("--submit: sbatch not found on PATH (not a Slurm login node?)")
        res = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        sys.stdout.write(res.stdout)
        if res.returncode != 0:
            raise UserError(f"sbatch refused the job: {res.stderr.strip()}")
    return 0


SHIPPED = {  # slurm/<file> -> how it is rendered; tests/test_slurm.py checks they are up to date
    "qlora_7b_1gpu.sbatch": dict(recipe="qlora_7b", nodes=1, gpus_per_node=1, time="24:00:00"),
    "sft_7b_zero3_2x8.sbatch": dict(recipe="sft_7b", nodes=2, gpus_per_node=8, time="24:00:00",
                                    extra_overrides=["plan.zero_stage=3"]),
}


def render_shipped(**kwargs) -> str:
    """The ready-made scripts in slurm/: submitted from the checkout (no --chdir), the checkout's .venv Python."""
    return render_sbatch(**kwargs, workdir=None, python=".venv/bin/python")


def regenerate() -> None:
    for name, kwargs in SHIPPED.items():
        path = REPO_ROOT / "slurm" / name
        path.write_text(render_shipped(**kwargs))
        path.chmod(0o755)
        print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        regenerate()
    else:
        sys.exit(cmd_slurm(sys.argv[1:]))
