"""One run, on one rank: recipe -> plan -> DeepSpeed config -> recipe's trainer -> save -> manifest -> summary.

Every rank executes this same code with the same inputs, so every rank computes the same plan; only rank 0 writes
files. Side effects live here; the planning core it calls is pure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import load_recipe, to_yaml_dict
from launcher.dist import (DistEnv, agree_on_inventory, join_process_group, leave_process_group, rank0s,
                           refuse_bare_srun_tasks)
from launcher.errors import ArgParser, PlanDoesNotFit, UserError, remove_created, writable_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = Path(os.environ.get("FTLAUNCH_DS_CONFIG_DIR", REPO_ROOT / "ds_configs"))
DIVERGED_EXIT_CODE = 1  # loss went NaN/inf or the gradient norm exploded; the last good checkpoint is kept


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
                f"{self.cfg.data.max_length} (micro-batches are padded to their longest row); ZeRO stage and offload "
                f"as planned for data.max_length")
        request = replace(request, seq_len=request.seq_len - cut, zero_stage=first.zero_stage, offload=first.offload,
                          notes=[*request.notes, note],
                          kept=(*request.kept, *(k for k in ("zero_stage", "offload") if getattr(request, k) is None)))
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


def tell_sbatch_script(why: str) -> None:
    """Rank 0 leaves why the run stopped where the sbatch script looks (FTLAUNCH_EXIT_FILE): it requeues only on
    `preempted`, as exit codes through srun and torchrun cannot tell a preemption checkpoint from a failure."""
    target = os.environ.get("FTLAUNCH_EXIT_FILE")
    if not target:
        return
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(why)
    except OSError as e:
        print(f"ftlaunch: warning: cannot write {target} ({e.strerror}); the job will not be requeued",
              file=sys.stderr, flush=True)


def keep_checkpoint_stage(request, output_dir, resume: str) -> None:
    """A run resuming a DeepSpeed checkpoint plans for the ZeRO stage that wrote it (DeepSpeed loads a checkpoint
    only into that stage), unless the recipe pins one: a requeued job on nodes with less free memory would
    otherwise be refused for a stage its own plan changed."""
    from launcher.checkpoints import resume_zero_stage

    kept = resume_zero_stage(Path(output_dir), resume) if request.zero_stage is None else None
    if kept is not None:
        request.zero_stage, request.kept = kept[0], (*request.kept, "zero_stage")
        request.notes.append(f"plan.zero_stage={kept[0]}: the stage that wrote {kept[1]}, which this run resumes")


def make_plan(cfg, env: DistEnv, inputs: PlanInputs | None = None):
    from launcher.planner import plan as plan_memory

    inputs = inputs or plan_inputs(cfg, env)
    plan = plan_memory(inputs.request, inputs.inventory)
    if not plan.fits:
        raise PlanDoesNotFit(plan.reason)
    return plan


def evaluate(evaluator, when: str):
    """Rank 0 scores a freshly loaded copy of the model, alone: not a ZeRO-3 collective. Its GPU memory goes back to
    the device afterwards, not only to torch's cache: NCCL and other allocations outside torch need it too."""
    import gc

    import torch

    from recipes.builder import outside_zero3

    with outside_zero3():
        result = evaluator(when)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


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

    # Before anything imports bitsandbytes (see quiet_known_noise); with HF_HUB_OFFLINE=1 (what ftlaunch's own
    # errors advise) the `kernels` package it loads warns that it skips a publisher check it cannot make offline.
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cfg = load_recipe(args.recipe, args.config, args.overrides)
    env = DistEnv.from_env(args.local_rank)
    refuse_bare_srun_tasks(env)
    inputs = plan_inputs(cfg, env)
    plan = make_plan(cfg, env, inputs)  # bad input (a batch the ranks cannot split, nothing fits) fails alone, at once
    join_process_group(env)
    from launcher.manifest import hold_output_dir, release_output_dir
    from recipes.common import method_module

    module = method_module(cfg.method)
    out, created = Path(cfg.output_dir), None
    try:
        ctx = prepare(cfg, env, args, inputs, plan)
        created = writable_dir(out, "output_dir")  # a file, a read-only place: one line now
        taken = rank0s(hold_output_dir(out) if env.is_main else None)  # one live run per output_dir
        if taken:
            created = None  # not ours to remove: the run holding it may have made it a moment before this one
            raise UserError(taken)
        code = _run(ctx, module, args, argv)
    except (UserError, PlanDoesNotFit):
        if env.is_main:  # nothing half-written
            remove_created(out, created)
        leave_process_group()  # raised by our own checks, between collectives: keeps its one line and exit code
        raise
    finally:
        release_output_dir()
    leave_process_group()
    return code


def prepare(cfg, env: DistEnv, args, inputs: PlanInputs, plan) -> RunContext:
    """The plan and DeepSpeed config. Launched ranks plan again, alike, from what they measured together (and a
    resuming run for its checkpoint's stage); one process keeps `plan`, made from the same inputs."""
    from launcher.ds_config import deepspeed_config, gradient_clipping
    from recipes.common import resumes

    if env.launched:
        inputs.inventory = agree_on_inventory(inputs.inventory)
        if resumes(cfg.method):
            keep_checkpoint_stage(inputs.request, cfg.output_dir, args.resume)
        plan = make_plan(cfg, env, inputs)
    ds = deepspeed_config(plan, gradient_clipping(cfg)) if env.launched else None
    ctx = RunContext(cfg=cfg, plan=plan, env=env, ds_config=ds, output_dir=Path(cfg.output_dir), planned_from=inputs)
    if cfg.plan.inventory:  # a recipe's what-if: `ftlaunch plan` uses it, a run has real hardware
        ctx.start_notes.append(f"plan.inventory={cfg.plan.inventory} is for `ftlaunch plan`; this run plans for "
                               f"what it has: {inputs.inventory.describe()}")
    return ctx


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

    can_resume = common.resumes(ctx.cfg.method)  # PPO restarts from scratch: nothing of a checkpoint is loaded
    resume = choose_resume(out, args.resume, to_yaml_dict(ctx.cfg) if can_resume else None, env.is_main)
    repartition = False
    if resume is not None and can_resume:
        from launcher.checkpoints import check_resumable

        repartition = check_resumable(resume, env.world_size, ctx.ds_config is not None, ctx.cfg.training.get("optim"),
                                      ctx.plan.zero_stage if ctx.ds_config is not None else None)

    started = time.time()
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
    stopped_early = None
    if preempted and not can_resume:  # nothing to requeue for: keep the model so far as the run's result, exit 0
        stopped_early = (f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} by a preemption "
                         f"warning; {ctx.cfg.method} cannot resume (TRL's trainer has no resume), so the model so far "
                         f"is saved as the result; rerun with a longer time limit to train it all")
    elif preempted:
        from launcher.errors import PREEMPTED_EXIT_CODE
        from launcher.preempt import barrier

        if env.is_main:
            update_manifest(out, status="preempted", step=trainer.state.global_step)
            tell_sbatch_script("preempted")
            print(f"ftlaunch: preempted at step {trainer.state.global_step}; checkpoint saved, exiting for requeue")
        barrier()  # no rank exits (and gets rank 0 killed by srun) before the manifest says preempted
        return PREEMPTED_EXIT_CODE

    trainer.save_model(str(out))  # first: the final weights are safe before anything else can fail
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if env.is_main:
        from launcher.checkpoints import readable_weights

        readable_weights(out)
    if env.is_main and getattr(trainer, "processing_class", None) is not None:
        trainer.processing_class.save_pretrained(str(out))
    # (not in a preemption's warning window: generating with a 7B policy takes minutes)
    after = evaluate(evaluator, "after") if (evaluator and env.is_main and not stopped_early) else None
    if env.is_main:
        metrics = common.collect_metrics(trainer, result, eval_metrics, before, after, time.time() - started)
        metrics["data"] = ctx.stats
        update_manifest(out, status="stopped" if stopped_early else "finished", step=trainer.state.global_step,
                        metrics=metrics, **({"error": stopped_early} if stopped_early else {}))
        from launcher.model_card import write_model_card

        write_model_card(out, ctx.cfg, ctx.plan, metrics, getattr(trainer.model.config, "num_labels", None))
        common.print_summary(ctx, trainer, metrics)
        if stopped_early:
            print(f"ftlaunch: {stopped_early}", flush=True)
    return 0
