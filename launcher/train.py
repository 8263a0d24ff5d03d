"""One run, on one rank: recipe -> plan -> DeepSpeed config -> recipe's trainer -> save -> manifest -> summary.

Every rank executes this same code with the same inputs, so every rank computes the same plan; only rank 0 writes
files. Side effects live here; the planning core it calls is pure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import load_recipe, to_yaml_dict
from launcher.errors import ArgParser, PlanDoesNotFit, UserError, writable_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = Path(os.environ.get("FTLAUNCH_DS_CONFIG_DIR", REPO_ROOT / "ds_configs"))
DIVERGED_EXIT_CODE = 1  # loss went NaN/inf or the gradient norm exploded; the last good checkpoint is kept


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


@dataclass
class PlanInputs:
    """What a run's plan was made from (plain data), kept so the run can plan again once it has counted its rows."""

    request: object  # PlanRequest (its shape is the model's)
    inventory: object  # Inventory


@dataclass
class RunContext:
    """What a recipe module gets: validated config, the plan, and where things go."""

    cfg: object
    plan: object
    env: DistEnv
    ds_config: dict | None
    output_dir: Path
    callbacks: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # data counts etc., shown in the summary
    planned_from: PlanInputs | None = None  # None: the plan stays as given (benchmarks pin theirs)
    start_notes: list = field(default_factory=list)  # lines for the start of the run (recipes.common.print_start)

    def fit_plan_to_rows(self, longest: int) -> None:
        """Plan again for sequences of `longest` tokens, the data's longest row (after truncation or dropping),
        when that is under data.max_length: the collators pad each micro-batch to its longest row, so no batch is
        longer, and shorter sequences free activation memory for a larger micro-batch or no recompute. ZeRO stage
        and offload stay as first planned (the pre-flight host check ran for them). Every rank counts the same
        rows, so every rank still plans the same. The recipe reads ctx.plan after loading its data."""
        from dataclasses import replace

        from launcher.ds_config import deepspeed_config, gradient_clipping
        from launcher.plan_explain import changed_choices
        from launcher.planner import plan as plan_memory

        cut = self.cfg.data.max_length - longest
        if self.planned_from is None or cut <= 0:
            return
        first, request = self.plan, self.planned_from.request
        note = (f"seq_len {request.seq_len - cut}: the data's longest row is {longest} tokens, under data.max_length "
                f"{self.cfg.data.max_length} (micro-batches are padded to their longest row)")
        request = replace(request, seq_len=request.seq_len - cut, zero_stage=first.zero_stage, offload=first.offload,
                          notes=[*request.notes, note],
                          kept=tuple(k for k in ("zero_stage", "offload") if getattr(request, k) is None))
        fitted = plan_memory(request, self.planned_from.inventory)
        if not fitted.fits:  # shorter sequences never need more memory; keep the first plan if they somehow do
            return
        self.plan = fitted
        if self.ds_config is not None:  # keep this start's one-off resume switch (see _run)
            kept = {k: v for k, v in self.ds_config.items() if k == "checkpoint"}
            self.ds_config = {**deepspeed_config(fitted, gradient_clipping(self.cfg)), **kept}
        changes = changed_choices(first, fitted)
        if changes:  # otherwise only the plan's reasons (manifest, summary) mention the shorter rows
            self.start_notes.append(f"planned for rows of at most {longest} tokens (the data's longest; "
                                    f"data.max_length {self.cfg.data.max_length}): {changes}")


def parse_args(argv: list[str]):
    parser = ArgParser(prog="ftlaunch run", description="Plan and run a fine-tuning recipe.")
    parser.add_argument("--recipe", help="a shipped recipe name (see `ftlaunch recipes`)")
    parser.add_argument("--config", help="a recipe YAML file of your own")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume", default="auto",
                        help="auto (newest complete checkpoint in output_dir), never, or a checkpoint path")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--verbose", action="store_true", help="log from every rank, not only rank 0")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=20")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --resume etc.


def plan_inputs(cfg, env: DistEnv) -> PlanInputs:
    from launcher.inventory import detect_inventory
    from launcher.recipe_request import request_from_recipe

    # Without a launcher this is one process, even on a machine with several GPUs (NVML would count them all).
    env_vars = dict(os.environ) if env.launched else {**os.environ, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    request = request_from_recipe(cfg)
    request.deepspeed = env.launched  # the engine (with its fp32 masters) runs even on one rank
    return PlanInputs(request, detect_inventory(spec=None, env=env_vars))


def make_plan(cfg, env: DistEnv, inputs: PlanInputs | None = None):
    from launcher.planner import plan as plan_memory

    inputs = inputs or plan_inputs(cfg, env)
    plan = plan_memory(inputs.request, inputs.inventory)
    if not plan.fits:
        raise PlanDoesNotFit(plan.reason)
    return plan


def join_process_group(ctx: RunContext) -> None:
    """Under DeepSpeed every rank joins the process group before the model loads: ZeRO-3's zero.Init (inside
    from_pretrained) sizes its partitions from deepspeed.comm, which the HF Trainer sets up only later when ranks
    are CPUs (use_cpu=True takes accelerate's path), so zero.Init would see a world of one and fail its batch check.
    If torch.distributed is already up, DeepSpeed just wraps it."""
    if ctx.ds_config is None:
        return
    import deepspeed

    deepspeed.init_distributed()
    release_cpu_allreduce_buffer(ctx.env.rank)


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


def evaluate(evaluator, when: str):
    """Rank 0 scores a freshly loaded copy of the model, alone: not a ZeRO-3 collective."""
    from recipes.builder import outside_zero3

    with outside_zero3():
        return evaluator(when)


def quiet_known_noise(verbose: bool) -> None:
    """What the libraries print that is not the user's business; `--verbose` shows it all.

    (`run` hides one notice always, before anything imports bitsandbytes: its CPU backend warns, on CPUs with
    AVX512-BF16, that the optional hub package `kernels` is absent -- it could not be fetched offline anyway and the
    built-in kernel is used -- and a bad-input error must stay one line.) Per-map progress bars of datasets/TRL
    preprocessing and transformers' weight loading drown the one progress line per logging step that
    ProgressPrinter writes; transformers >= 5.25 tells every SFT run that TRL 1.12's chunked-loss output still
    names its cache `past_key_values`, which nobody running ftlaunch can act on."""
    if verbose:
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.get_logger("transformers.utils.generic").addFilter(_not_cache_rename_notice)  # once per logger


def _not_cache_rename_notice(record) -> bool:
    return "`past_key_values`/`cache_params` are deprecated" not in record.getMessage()


def quiet_other_ranks(env: DistEnv, verbose: bool) -> None:
    """Rank 0 talks; the others only on errors (unless --verbose)."""
    if env.is_main or verbose:
        return
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def write_run_files(ctx: RunContext, argv: list[str], trainer) -> None:
    from launcher.manifest import redact, write_manifest

    out = ctx.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(_yaml(to_yaml_dict(ctx.cfg)))
    # The TrainingArguments the plan and recipe produced, readable (HF only pickles them into training_args.bin).
    (out / "training_args.json").write_text(json.dumps(redact(trainer.args.to_dict()), indent=2, default=str))
    if ctx.ds_config is not None:
        # without this start's universal-resume switch: reused later, it would make every load demand one
        text = json.dumps({k: v for k, v in ctx.ds_config.items() if k != "checkpoint"}, indent=2)
        (out / "ds_config.json").write_text(text)
        DS_CONFIG_DIR.mkdir(parents=True, exist_ok=True)
        (DS_CONFIG_DIR / f"{ctx.cfg.name}-{out.name}.json").write_text(text)
    write_manifest(out, ctx.cfg, ctx.plan, argv, status="running", world_size=ctx.env.world_size)


def _yaml(data) -> str:
    import yaml

    from launcher.manifest import redact

    return yaml.safe_dump(redact(data), sort_keys=False)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    import logging

    # Before anything imports bitsandbytes (see quiet_known_noise).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cfg = load_recipe(args.recipe, args.config, args.overrides)
    env = DistEnv.from_env(args.local_rank)
    inputs = plan_inputs(cfg, env)
    plan = make_plan(cfg, env, inputs)
    from launcher.ds_config import deepspeed_config, gradient_clipping

    ds = deepspeed_config(plan, gradient_clipping(cfg)) if env.launched else None
    out = Path(cfg.output_dir)
    existed = out.is_dir() and any(out.iterdir())
    writable_dir(out, "output_dir")  # a file, a read-only place: one line now, not a traceback after the model loads
    ctx = RunContext(cfg=cfg, plan=plan, env=env, ds_config=ds, output_dir=out, planned_from=inputs)
    if cfg.plan.inventory:  # a recipe's what-if: `ftlaunch plan` uses it, a run has real hardware
        ctx.start_notes.append(f"plan.inventory={cfg.plan.inventory} is for `ftlaunch plan`; this run plans for "
                               f"what it has: {inputs.inventory.describe()}")
    module = importlib.import_module(f"recipes.{cfg.method}")  # one module per method
    try:
        code = _run(ctx, module, args, argv)
    except UserError:
        if env.is_main and not existed and out.exists():  # nothing half-written
            shutil.rmtree(out, ignore_errors=True)
        leave_process_group()  # raised by our own checks, between collectives: keeps its one line and exit 2
        raise
    leave_process_group()
    return code


def _run(ctx: RunContext, module, args, argv: list[str]) -> int:
    from launcher.manifest import check_finished_run_unchanged, read_manifest, update_manifest
    from recipes import common

    env, out = ctx.env, ctx.output_dir
    common.check_training_section(ctx.cfg)  # a typo is no "nothing to do"
    previous = read_manifest(out)
    if previous and previous.get("status") == "finished":
        check_finished_run_unchanged(out, previous, ctx.cfg, args.resume)
        if env.is_main:
            print(f"ftlaunch: {out} already holds a finished run (step {previous.get('step', '?')}); nothing to do "
                  f"(to train again use a new output_dir; to train this model further, start from it: "
                  f"model.name={out} output_dir=NEW)")
        return 0
    quiet_known_noise(args.verbose)
    quiet_other_ranks(env, args.verbose)
    common.seed_everything(ctx.cfg.seed)
    from launcher.checkpoints import choose_resume

    resumes = getattr(module, "RESUMES", True)  # PPO restarts from scratch: nothing of a checkpoint is loaded
    resume = choose_resume(out, args.resume, to_yaml_dict(ctx.cfg) if resumes else None, env.is_main)
    repartition = False
    if resume is not None and resumes:
        from launcher.checkpoints import check_resumable

        repartition = check_resumable(resume, env.world_size, ctx.ds_config is not None, ctx.cfg.training.get("optim"),
                                      ctx.plan.zero_stage if ctx.ds_config is not None else None)

    started = time.time()
    join_process_group(ctx)
    if repartition:
        from launcher.checkpoints import load_universal_on_all_ranks

        load_universal_on_all_ranks(resume, env.is_main, env.world_size)
        # for this start's resume only: recipes/callbacks.UniversalLoadOnce turns it off once loaded
        ctx.ds_config.setdefault("checkpoint", {})["load_universal"] = True
    from launcher.inventory import _local_world_size
    from launcher.preflight import at_start

    at_start(ctx.plan, env.rank, env.local_rank, env.world_size,
             int(_local_world_size(os.environ) or ctx.plan.gpus_per_node or 1))  # torchrun's or deepspeed's name
    trainer, evaluator = module.build(ctx)  # loads data and model; bad data fails here, before any file is written
    ctx.callbacks.extend(common.default_callbacks(ctx, trainer))
    from launcher.checkpoints import AlreadyTrained
    from recipes.callbacks import CheckpointCommitter, StopAtFinalCheckpoint

    committer = CheckpointCommitter(keep=ctx.cfg.safety.keep_checkpoints)
    committer.take_over_rotation(trainer.args)  # HF would rotate before the new checkpoint is marked complete
    ctx.callbacks += [StopAtFinalCheckpoint(), committer]  # committer last: sees should_save set by every other one
    if repartition:
        from recipes.callbacks import UniversalLoadOnce

        ctx.callbacks.append(UniversalLoadOnce(trainer))
    for callback in ctx.callbacks:
        trainer.add_callback(callback)
    if env.is_main:
        write_run_files(ctx, argv, trainer)
        common.print_start(ctx, trainer, resume)
    before = evaluate(evaluator, "before") if (evaluator and env.is_main and resume is None) else None
    if before is not None:  # kept now, so a run that is preempted and resumed still reports its baseline
        update_manifest(out, metrics={"before": before})
    elif previous:
        before = (previous.get("metrics") or {}).get("before")

    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except AlreadyTrained:
        result = None  # the final checkpoint is loaded: save, evaluate and report it as any finished run
    except Exception as exc:
        if env.is_main:
            update_manifest(out, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    except KeyboardInterrupt:  # Ctrl-C: no checkpoint (SIGTERM/SIGUSR1 save one), but the record says it stopped
        if env.is_main:
            update_manifest(out, status="interrupted", step=trainer.state.global_step)
        raise
    preempted = any(getattr(cb, "preempted", False) for cb in ctx.callbacks)
    stopped = next((cb.stop_reason for cb in ctx.callbacks if getattr(cb, "stop_reason", None)), None)
    if stopped:  # first: a run that diverged at the warned step saved nothing, and a requeue would diverge again
        if env.is_main:
            update_manifest(out, status="failed", step=trainer.state.global_step, error=stopped)
            print(f"ftlaunch: error: {stopped}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT_CODE
    if preempted:
        from launcher.errors import PREEMPTED_EXIT_CODE
        from launcher.preempt import barrier

        if env.is_main:
            update_manifest(out, status="preempted", step=trainer.state.global_step)
            print(f"ftlaunch: preempted at step {trainer.state.global_step}; checkpoint saved, exiting for requeue")
        barrier()  # no rank exits (and gets rank 0 killed by srun) before the manifest says preempted
        return PREEMPTED_EXIT_CODE

    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    trainer.save_model(str(out))
    if env.is_main:
        from launcher.checkpoints import readable_weights

        readable_weights(out)
    if env.is_main and getattr(trainer, "processing_class", None) is not None:
        trainer.processing_class.save_pretrained(str(out))
    after = evaluate(evaluator, "after") if (evaluator and env.is_main) else None
    if env.is_main:
        metrics = common.collect_metrics(trainer, result, eval_metrics, before, after, time.time() - started)
        metrics["data"] = ctx.stats
        update_manifest(out, status="finished", step=trainer.state.global_step, metrics=metrics)
        from launcher.model_card import write_model_card

        write_model_card(out, ctx.cfg, ctx.plan, metrics, getattr(trainer.model.config, "num_labels", None))
        common.print_summary(ctx, trainer, metrics)
    return 0
