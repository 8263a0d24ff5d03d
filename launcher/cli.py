"""`ftlaunch` console script: dispatches sub-commands, maps errors to exit codes (DESIGN.md)."""
from __future__ import annotations

import importlib
import os
import sys

from launcher.errors import ArgParser, PlanDoesNotFit, PreflightError, UserError

USAGE = """usage: ftlaunch COMMAND [options]

commands:
  run        plan and train a recipe (same as `python launcher/run.py`)
  plan       show the memory plan and DeepSpeed config a recipe would get, without loading anything
  inventory  show the GPUs / nodes ftlaunch sees
  recipes    list the shipped recipes
  pipeline   run a chained recipe (e.g. rlhf_tiny: SFT -> reward model -> PPO)
  slurm      render an sbatch script for a recipe
  check      pre-flight checks (all-reduce across ranks, /dev/shm, host RAM)
  export     merge a LoRA/QLoRA adapter into its base and write a full HF model
  runs       list past runs with status, step and held-out score
"""

# command -> (module, function taking argv and returning an exit code)
COMMANDS = {
    "run": ("launcher.train", "run"),
    "plan": ("launcher.plan_cmd", "cmd_plan"),
    "inventory": ("launcher.plan_cmd", "cmd_inventory"),
    "recipes": ("launcher.cli", "cmd_recipes"),
    "pipeline": ("launcher.pipeline", "cmd_pipeline"),
    "slurm": ("launcher.slurm", "cmd_slurm"),
    "check": ("launcher.preflight", "cmd_check"),
    "export": ("launcher.export", "cmd_export"),
    "runs": ("launcher.runs", "cmd_runs"),
}


def cmd_recipes(argv: list[str]) -> int:
    import yaml

    from launcher.config import available_recipes

    ArgParser(prog="ftlaunch recipes", description="list the shipped recipes").parse_args(argv)
    rows = []
    for name, path in available_recipes().items():
        data = yaml.safe_load(path.read_text()) or {}
        rows.append((name, data.get("method", "?"), data.get("description", "")))
    width = max(len(r[0]) for r in rows)
    for name, method, text in rows:
        print(f"{name:<{width}}  {method:<8}  {text}")
    return 0


def _reports(verbose: bool) -> bool:
    """Under a launcher every rank fails the same way on the same input: rank 0 says it once (others with
    --verbose)."""
    return verbose or os.environ.get("RANK", "0") == "0"


def guarded(func, argv: list[str], debug: bool, verbose: bool = False) -> int:
    """Run a command; bad input -> one line + exit 2, no fit -> exit 3, no traceback unless --debug."""
    try:
        return int(func(argv) or 0)
    except (UserError, PlanDoesNotFit, PreflightError) as e:
        if debug:
            raise
        if isinstance(e, PreflightError) or _reports(verbose):
            print(f"ftlaunch: {e.label}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except BrokenPipeError:  # `ftlaunch plan | head`: the reader left; not an error of ours
        sys.stderr = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("ftlaunch: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed ftlaunch check ...` puts --local_rank=N before the command; the rank is in $LOCAL_RANK as well
    while argv and argv[0].startswith("--local_rank"):
        argv = argv[2:] if argv[0] == "--local_rank" else argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"ftlaunch: error: unknown command '{command}'{hint}; see `ftlaunch --help`", file=sys.stderr)
        return 2
    module, name = COMMANDS[command]
    func = getattr(importlib.import_module(module), name)
    debug = "--debug" in rest or os.environ.get("FTLAUNCH_DEBUG") == "1"
    return guarded(func, rest, debug, verbose="--verbose" in rest)


if __name__ == "__main__":
    sys.exit(main())
