"""`ftlaunch pipeline NAME`: run a chained recipe, stage by stage (e.g. rlhf_tiny: SFT -> reward model -> PPO).

A pipeline is a recipe with a `pipeline:` section:

    pipeline:
      output_dir: runs/rlhf_tiny          # one sub-directory per stage (default runs/<recipe name>)
      stages:
        - name: sft
          recipe: sft_tiny                # a shipped recipe name, or `config: path/to/file.yaml`
          overrides: [training.max_steps=300]
        - name: rm
          recipe: rm_tiny
          overrides: ["model.name={sft}"] # {stage} = that earlier stage's output directory
        - name: ppo
          recipe: rlhf_tiny
          overrides: ["model.name={sft}", "ppo.reward_model={rm}"]

Each stage is launched exactly like a single recipe, as its own process (`python launcher/run.py --recipe R ...`, or
`deepspeed --num_gpus N launcher/run.py ...` with --num-gpus N), so a stage's memory is freed before the next
starts and every stage gets the same plan/manifest/summary as a single run. A stage whose output's manifest says
`status: finished` is skipped, so re-running a pipeline after a failure continues where it stopped (a stage that
stopped midway resumes from its newest checkpoint, as single runs do).

Command-line overrides: `key=value` applies to every stage, `STAGE:key=value` to one stage, e.g.
`ftlaunch pipeline rlhf_tiny training.max_steps=5 ppo:training.max_steps=3`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.errors import ArgParser, UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_SCRIPT = REPO_ROOT / "launcher" / "run.py"
STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
REFERENCE = re.compile(r"\{([A-Za-z][A-Za-z0-9_-]*)\}")


def _check_finished_stage_unchanged(name: str, out: Path, cfg) -> None:
    """A finished stage is skipped; if its settings have changed since, skipping it would feed the next stages the
    old model (a new reward model's settings, PPO on the old one): refuse, naming what changed."""
    from launcher.manifest import changed_settings, read_manifest, summarize_changes

    changed = changed_settings(read_manifest(out), cfg)
    if changed:
        raise UserError(f"pipeline stage '{name}': {out} finished with other settings ({summarize_changes(changed)}"
                        f"); remove {out} to train it again, or drop the change")


def parse_args(argv: list[str]):
    parser = ArgParser(prog="ftlaunch pipeline",
                                     description="Run a chained recipe (each stage consumes the previous outputs).")
    parser.add_argument("recipe", nargs="?", help="a shipped pipeline recipe, e.g. rlhf_tiny")
    parser.add_argument("--config", help="a pipeline recipe YAML file of your own")
    parser.add_argument("--output-dir", help="root directory of the stages' outputs (default: pipeline.output_dir)")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="launch every stage with `deepspeed --num_gpus N` (N ranks)")
    parser.add_argument("--hostfile", help="launch every stage with `deepspeed --hostfile F` (multi-node)")
    parser.add_argument("--launcher", help="launch every stage with this command instead, e.g. "
                                           "'torchrun --nproc_per_node 4' (run.py and its arguments are appended)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands without running them")
    parser.add_argument("--debug", action="store_true", help="pass --debug to every stage (tracebacks)")
    parser.add_argument("overrides", nargs="*", help="key=value (every stage) or STAGE:key=value (one stage)")
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if u.startswith("-")]
    if stray:
        raise UserError(f"pipeline: unknown option {stray[0]}; see `ftlaunch pipeline --help`")
    args.overrides += unknown
    return args


def load_stages(cfg) -> list[dict]:
    """The validated `pipeline.stages` list: [{name, recipe | config, overrides}]."""
    from launcher.config import available_recipes

    section = cfg.section("pipeline")
    if not section:
        raise UserError(f"recipe '{cfg.name}' has no pipeline: section; run it with `ftlaunch run --recipe "
                        f"{cfg.name}`, or give a pipeline recipe such as rlhf_tiny")
    stages = section.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError("pipeline.stages: expected a non-empty list of {name, recipe, overrides}")
    recipes = available_recipes()
    seen: list[str] = []
    out = []
    for i, stage in enumerate(stages):
        where = f"pipeline.stages[{i}]"
        if not isinstance(stage, dict):
            raise UserError(f"{where}: expected a mapping with name, recipe and overrides")
        bad = set(stage) - {"name", "recipe", "config", "overrides"}
        if bad:
            raise UserError(f"{where}.{sorted(bad)[0]}: unknown key; valid keys: name, recipe, config, overrides")
        name = stage.get("name")
        if not isinstance(name, str) or not STAGE_NAME.match(name):
            raise UserError(f"{where}.name: expected a short name (letters, digits, _ or -), got {name!r}")
        if name in seen:
            raise UserError(f"{where}.name: stage '{name}' appears twice")
        recipe, config = stage.get("recipe"), stage.get("config")
        if bool(recipe) == bool(config):
            raise UserError(f"{where}: give exactly one of recipe (a shipped recipe name) or config (a YAML file)")
        if recipe and recipe not in recipes:
            raise UserError(f"{where}.recipe: unknown recipe '{recipe}'; run `ftlaunch recipes` to list them")
        if config and not Path(config).is_file():
            raise UserError(f"{where}.config: {config}: file not found")
        overrides = stage.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise UserError(f"{where}.overrides: expected a list of key=value strings, got {overrides!r}")
        for o in overrides:
            for ref in REFERENCE.findall(o):
                if ref not in seen:
                    raise UserError(f"{where}.overrides: '{o}' refers to {{{ref}}}, which is not an earlier stage "
                                    f"(earlier stages: {', '.join(seen) or 'none'})")
            if o.split("=", 1)[0].strip() == "output_dir":
                raise UserError(f"{where}.overrides: output_dir is set by the pipeline (pipeline.output_dir/{name})")
        seen.append(name)
        out.append({"name": name, "recipe": recipe, "config": config, "overrides": list(overrides)})
    return out


def split_cli_overrides(overrides: list[str], names: list[str]) -> tuple[list[str], dict]:
    """`key=value` -> every stage; `STAGE:key=value` -> that stage."""
    common, per_stage = [], {n: [] for n in names}
    for item in overrides:
        head = item.split("=", 1)[0]
        if ":" in head:
            stage, rest = item.split(":", 1)
            if stage not in per_stage:
                raise UserError(f"override '{item}': no stage '{stage}' (stages: {', '.join(names)})")
            per_stage[stage].append(rest)
        else:
            if "=" not in item:
                raise UserError(f"override '{item}': expected key=value or STAGE:key=value")
            if head.strip() == "output_dir" or head.strip().startswith("pipeline."):
                raise UserError(f"override '{item}': the pipeline's own settings are not overrides (they would "
                                f"reach every stage); use --output-dir DIR for the root directory")
            common.append(item)
    return common, per_stage


def launcher_prefix(args) -> list[str]:
    if sum(bool(x) for x in (args.num_gpus, args.hostfile, args.launcher)) > 1:
        raise UserError("pipeline: give at most one of --num-gpus, --hostfile, --launcher")
    if args.launcher:
        return shlex.split(args.launcher)
    if args.num_gpus is not None or args.hostfile:
        if args.num_gpus is not None and args.num_gpus < 1:
            raise UserError(f"--num-gpus: must be at least 1, got {args.num_gpus}")
        local = Path(sys.executable).parent / "deepspeed"
        ds = str(local) if local.exists() else (shutil.which("deepspeed") or "deepspeed")
        return [ds, "--num_gpus", str(args.num_gpus)] if args.num_gpus is not None else [ds, "--hostfile",
                                                                                           args.hostfile]
    return [sys.executable]


def stage_env(args) -> dict:
    env = dict(os.environ)
    ranks = args.num_gpus or 1
    if ranks > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))  # ranks x threads <= cores
    return env


def _stage_summary(manifest: dict) -> str:
    metrics = manifest.get("metrics") or {}
    parts = [f"step {manifest.get('step', metrics.get('global_step', '?'))}"]
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for key in ("pairwise_accuracy", "score", "accuracy", "exact_match", "f1_macro"):
        if isinstance(after.get(key), (int, float)):
            b = before.get(key)
            parts.append(f"{key} {b:.3f} -> {after[key]:.3f}" if isinstance(b, (int, float))
                         else f"{key} {after[key]:.3f}")
    return ", ".join(parts)


def cmd_pipeline(argv: list[str]) -> int:
    from launcher.config import RUNS_DIR, load_recipe
    from launcher.manifest import read_manifest

    args = parse_args(argv)
    cfg = load_recipe(args.recipe, args.config, [])
    stages = load_stages(cfg)
    names = [s["name"] for s in stages]
    common_overrides, per_stage = split_cli_overrides(args.overrides, names)
    root = Path(args.output_dir or cfg.section("pipeline").get("output_dir") or Path(RUNS_DIR) / cfg.name)
    outputs = {s["name"]: root / s["name"] for s in stages}
    prefix = launcher_prefix(args)
    env = stage_env(args)

    # Resolve and validate every stage's recipe first: a typo in stage 3 fails now, not after an hour of stage 1.
    commands = []
    for stage in stages:
        overrides = [REFERENCE.sub(lambda m: str(outputs[m.group(1)]), o) for o in stage["overrides"]]
        overrides += common_overrides + per_stage[stage["name"]] + [f"output_dir={outputs[stage['name']]}"]
        try:
            stage_cfg = load_recipe(stage["recipe"], stage["config"], overrides)
        except UserError as e:
            raise UserError(f"pipeline stage '{stage['name']}': {e}") from None
        _check_finished_stage_unchanged(stage["name"], outputs[stage["name"]], stage_cfg)
        source = ["--recipe", stage["recipe"]] if stage["recipe"] else ["--config", stage["config"]]
        commands.append((stage, [*prefix, str(RUN_SCRIPT), *source, *overrides] + (["--debug"] if args.debug else [])))

    print(f"ftlaunch: pipeline {cfg.name}: {' -> '.join(names)} under {root}", flush=True)
    done = []
    for i, (stage, command) in enumerate(commands, 1):
        out = outputs[stage["name"]]
        manifest = read_manifest(out) or {}
        label = f"[{i}/{len(commands)}] {stage['name']}"
        if manifest.get("status") == "finished":
            print(f"ftlaunch: {label}: {out} already holds a finished run; skipped", flush=True)
            done.append((stage["name"], "skipped (finished)", manifest))
            continue
        print(f"ftlaunch: {label}: {shlex.join(command)}", flush=True)
        if args.dry_run:
            continue
        rc = subprocess.call(command, env=env)
        if rc != 0:
            print(f"ftlaunch: pipeline {cfg.name}: stage '{stage['name']}' failed (exit {rc}); fix it and run the "
                  f"same command again: finished stages are skipped", file=sys.stderr, flush=True)
            return rc
        manifest = read_manifest(out) or {}
        if manifest.get("status") != "finished":
            print(f"ftlaunch: pipeline {cfg.name}: stage '{stage['name']}' exited 0 but {out}/manifest.json says "
                  f"'{manifest.get('status')}'", file=sys.stderr, flush=True)
            return 1
        done.append((stage["name"], "finished", manifest))
    if not args.dry_run:
        print(f"ftlaunch: pipeline {cfg.name} finished:", flush=True)
        for name, status, manifest in done:
            print(f"  {name:<8} {status:<20} {_stage_summary(manifest)}  ({outputs[name]})", flush=True)
    return 0
