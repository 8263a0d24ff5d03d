"""`ftlaunch plan` and `ftlaunch inventory`: show the plan a recipe would get, without loading torch or a model."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys

from launcher.errors import ArgParser, PlanDoesNotFit, UserError
from launcher.memory import GiB, fmt_bytes


def _plan_parser() -> ArgParser:
    p = ArgParser(prog="ftlaunch plan", description=(
        "Show the memory plan (ZeRO stage, offload, micro-batch, checkpointing) and DeepSpeed config a recipe gets. "
        "Exit 3 when nothing fits."))
    p.add_argument("--recipe", help="a shipped recipe name (see `ftlaunch recipes`)")
    p.add_argument("--config", help="a recipe YAML file of your own")
    p.add_argument("--model", help="without a recipe: hub id, built-in card or local dir with config.json")
    p.add_argument("--method", choices=["full", "lora", "qlora"], help="without a recipe (default full)")
    p.add_argument("--seq-len", type=int, help="without a recipe (default 2048)")
    p.add_argument("--global-batch", type=int, help="without a recipe (default 16)")
    p.add_argument("--lora-r", type=int, help="without a recipe (default 16)")
    p.add_argument("--optim", help="without a recipe: HF optim name (default: the HF Trainer's, adamw_torch_fused)")
    p.add_argument("--inventory", help="what-if hardware, e.g. 1xRTX3090-24GB, 8xA100-40GB, 4x8xH100-80GB, 2xcpu")
    p.add_argument("--hostfile", help="plan for the nodes of a DeepSpeed hostfile (GPUs probed here)")
    p.add_argument("--host-ram", type=float, metavar="GIB",
                   help="host RAM per node of a what-if --inventory (default: 2x its GPU memory, at least 64)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--offload", choices=["none", "optimizer", "all"])
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--gradient-checkpointing", choices=["on", "off"])
    p.add_argument("--memory-fraction", type=float)
    p.add_argument("--deepspeed", action="store_true",
                   help="plan a launched run (deepspeed/torchrun/srun): the DeepSpeed engine runs even on one GPU")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--ds-config", action="store_true", help="also print the DeepSpeed JSON (implies --deepspeed)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.max_length=4096 peft.r=64")
    return p


def _check_optimizer_name(name: str) -> None:
    """--optim is an HF `optim` name (what training.optim takes); only then is transformers imported (~4 s)."""
    import difflib

    from transformers.training_args import OptimizerNames

    valid = [o.value for o in OptimizerNames]
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"--optim: '{name}' is not an HF optimizer name{hint}"
                        f"; e.g. adamw_torch, adamw_torch_fused, paged_adamw_8bit, adafactor")


def _pins(args) -> dict:
    if args.micro_batch is not None and args.micro_batch < 1:
        raise UserError(f"--micro-batch: must be positive, got {args.micro_batch}")
    pins = {"zero_stage": args.zero_stage, "offload": args.offload, "micro_batch_size": args.micro_batch,
            "gradient_checkpointing": None if args.gradient_checkpointing is None
            else args.gradient_checkpointing == "on", "memory_fraction": args.memory_fraction}
    return {k: v for k, v in pins.items() if v is not None}


def build_plan(args):
    """(plan, inventory, gradient clipping) from parsed arguments: a recipe, or --model/--method. The clipping is
    the recipe's training.max_grad_norm (HF's 1.0 without a recipe), as the run writes it into the DeepSpeed JSON."""
    from launcher.ds_config import gradient_clipping
    from launcher.inventory import detect_inventory
    from launcher.planner import PlanRequest, plan
    from launcher.recipe_request import request_from_recipe
    from launcher.shapes import resolve_shape

    pins = _pins(args)
    model_only = {"--model": args.model, "--method": args.method, "--seq-len": args.seq_len,
                  "--global-batch": args.global_batch, "--lora-r": args.lora_r, "--optim": args.optim}
    if args.recipe or args.config:
        from launcher.config import load_recipe

        given = [name for name, value in model_only.items() if value is not None]
        if given:  # silently planning the recipe's own values instead would answer another question
            raise UserError(f"ftlaunch plan: {given[0]} applies without a recipe; with one give it as an override "
                            f"(model.name, method and peft.r in the recipe, data.max_length, plan.global_batch_size, "
                            f"training.optim)")
        overrides = list(args.overrides)
        for key, value in pins.items():  # through the recipe loader, so the same validation applies
            overrides.append(f"plan.{key}={json.dumps(value) if isinstance(value, bool) else value}")
        cfg = load_recipe(args.recipe, args.config, overrides)
        request = request_from_recipe(cfg)
        spec = args.inventory if args.inventory is not None or args.hostfile else cfg.plan.inventory  # typed wins
        clipping = gradient_clipping(cfg)
    else:
        if not args.model:
            raise UserError("ftlaunch plan: give --recipe NAME (or --config FILE), or --model NAME --method METHOD")
        if args.overrides:
            raise UserError(f"ftlaunch plan: key=value overrides ({args.overrides[0]}) need --recipe or --config")
        if args.lora_r is not None and args.method not in ("lora", "qlora"):
            raise UserError(f"--lora-r: applies to --method lora or qlora, not {args.method or 'full'}")
        if args.optim is not None:
            _check_optimizer_name(args.optim)
        from launcher.recipe_request import default_optimizer

        args.method, args.optim = args.method or "full", args.optim or default_optimizer()
        from launcher.config_checks import MAX_GLOBAL_BATCH

        if args.global_batch is not None and args.global_batch > MAX_GLOBAL_BATCH:
            raise UserError(f"--global-batch: must be at most {MAX_GLOBAL_BATCH}, got {args.global_batch}")
        for name, value, default in (("--seq-len", args.seq_len, 2048), ("--global-batch", args.global_batch, 16),
                                     ("--lora-r", args.lora_r, 16)):
            if value is not None and value < 1:
                raise UserError(f"{name}: must be positive, got {value}")
            setattr(args, name[2:].replace("-", "_"), value or default)
        from launcher.memory import SFT_LOSS_CHUNK_TOKENS

        # what `ftlaunch run` does with these methods: TRL's SFTTrainer, chunked loss
        request = PlanRequest(shape=resolve_shape(args.model), method=args.method, seq_len=args.seq_len,
                              global_batch_size=args.global_batch, lora_r=args.lora_r, optimizer=args.optim,
                              loss_chunk_tokens=SFT_LOSS_CHUNK_TOKENS,
                              quantized_adapter_bytes=2, **pins)  # as the SFT recipe: TRL's bf16 QLoRA adapters
        spec = args.inventory
        clipping = 1.0
    request.deepspeed = args.deepspeed or args.ds_config  # a DeepSpeed JSON is for a launched run
    if args.host_ram is not None and not 0 < args.host_ram < math.inf:
        raise UserError(f"--host-ram: must be a positive number (GiB per node), got {args.host_ram:g}")
    inventory = detect_inventory(spec, hostfile=args.hostfile,
                                 host_ram_bytes=None if args.host_ram is None else int(args.host_ram * 2 ** 30))
    if args.recipe or args.config:
        return plan(request, inventory), inventory, clipping
    try:
        result = plan(request, inventory)
    except UserError as e:
        raise UserError(as_flags(str(e))) from None
    result.reason, result.reasons = as_flags(result.reason), [as_flags(r) for r in result.reasons]
    result.rejected = [dict(item, reason=as_flags(item["reason"])) for item in result.rejected]
    return result, inventory, clipping


# The planner words its advice and pins in recipe keys; `ftlaunch plan --model` takes these flags instead.
MODEL_MODE_FLAGS = {"data.max_length": "--seq-len", "plan.global_batch_size": "--global-batch",
                    "training.optim": "--optim", "plan.zero_stage": "--zero-stage", "plan.offload": "--offload",
                    "plan.micro_batch_size": "--micro-batch", "plan.memory_fraction": "--memory-fraction",
                    "plan.gradient_checkpointing": "--gradient-checkpointing"}
_RECIPE_KEY = re.compile(r"\b(" + "|".join(map(re.escape, MODEL_MODE_FLAGS)) + r")=([^\s,;)]+)")


def as_flags(text: str) -> str:
    """'would fit: data.max_length=512' -> 'would fit: --seq-len 512' (checkpointing's true/false -> on/off)."""
    def flag(match: re.Match) -> str:
        value = {"True": "on", "False": "off"}.get(match.group(2), match.group(2))
        return f"{MODEL_MODE_FLAGS[match.group(1)]} {value}"

    return _RECIPE_KEY.sub(flag, text)


def cmd_plan(argv: list[str]) -> int:
    args = _plan_parser().parse_args(argv)
    result, inventory, clipping = build_plan(args)
    from launcher.ds_config import deepspeed_config

    # a plan for one plain process runs without DeepSpeed: no JSON to give (--deepspeed plans a launched run)
    ds = deepspeed_config(result, clipping) if result.fits and not result.single_process else None
    if args.json:
        out = result.to_json()
        out["deepspeed_config"] = ds
        print(json.dumps(out, indent=2))
    else:
        print(render_plan(result))
        if ds is not None and args.ds_config:
            print("\nDeepSpeed config:")
            print(json.dumps(ds, indent=2))
    if not result.fits:
        print(f"ftlaunch: does not fit: {result.reason}", file=sys.stderr)
        return PlanDoesNotFit.exit_code
    return 0


def _label(plan_dict: dict) -> str:
    parts = [f"ZeRO-{plan_dict['zero_stage']}"]
    if plan_dict.get("offload", "none") != "none":
        parts.append(f"offload {plan_dict['offload']}")
    if plan_dict.get("zero_hpz"):
        parts.append("hpZ")
    if "gradient_checkpointing" in plan_dict:
        parts.append("checkpointing " + ("on" if plan_dict["gradient_checkpointing"] else "off"))
    if "micro_batch_size" in plan_dict:
        parts.append(f"micro-batch {plan_dict['micro_batch_size']}")
    return ", ".join(parts)


def render_plan(plan) -> str:
    """Human view: decision, per-rank breakdown against capacity, reasons, rejected alternatives."""
    unit = "GPU" if plan.device == "cuda" else "CPU rank"
    m = plan.model
    trainable = f"{m.get('trainable_params', 0) / 1e6:.1f}M trainable"
    others = sum(x.get("trainable_params", 0) for role, x in plan.models.items() if role != "policy")
    if others:  # PPO's value model trains too
        trainable += f" + {others / 1e6:.1f}M in the other models"
    lines = [f"plan: {plan.method} of {m.get('name')} ({m.get('params', 0) / 1e9:.2f}B params, {trainable}) on "
             f"{m.get('inventory')}",
             f"seq_len {plan.seq_len}, global batch {plan.global_batch_size}, precision {plan.precision}", ""]
    offload = {"none": "no offload", "optimizer": "optimizer offloaded to CPU",
               "all": "optimizer and parameters offloaded to CPU"}[plan.offload]
    head = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{head}: ZeRO-{plan.zero_stage}, {offload}, gradient checkpointing "
                 f"{'on' if plan.gradient_checkpointing else 'off'}, micro-batch {plan.micro_batch_size} x "
                 f"accumulation {plan.gradient_accumulation_steps} x {plan.world_size} rank(s)"
                 + (f", hpZ {plan.zero_hpz_partition_size}" if plan.zero_hpz_partition_size else "")
                 + (f", bnb_4bit_quant_storage {plan.bnb_4bit_quant_storage}" if plan.bnb_4bit_quant_storage else ""))
    lines.append(f"\nper {unit}:")
    for key in ("weights", "gradients", "optimizer", "activations", "other"):
        lines.append(f"  {key:<12}{plan.per_gpu_bytes.get(key, 0) / GiB:8.2f} GiB")
    total = plan.per_gpu_bytes.get("total", 0)
    lines.append(f"  {'total':<12}{total / GiB:8.2f} GiB of {plan.usable_bytes / GiB:.2f} usable "
                 f"({plan.capacity_bytes / GiB:.2f} capacity)")
    host_cap = f" of {fmt_bytes(plan.host_capacity_bytes)} usable" if plan.host_capacity_bytes else ""
    lines.append(f"host RAM per node: {fmt_bytes(plan.host_bytes_per_node)}{host_cap}")
    if plan.predicted_step_seconds is not None:
        lines.append(f"predicted step time: {plan.predicted_step_seconds:.3g} s (the cost model's, to compare plans; not "
                     f"a measurement)")
    if len(plan.models) > 1:
        lines.append("\nmodels (per rank):")
        for role, info in plan.models.items():
            lines.append(f"  {role:<10} {info.get('placement', ''):<30} weights {fmt_bytes(info['weights'])}, "
                         f"grads {fmt_bytes(info['gradients'])}, optimizer {fmt_bytes(info['optimizer'])}")
    lines.append("\nwhy:")
    lines += [f"  - {reason}" for reason in plan.reasons]
    if plan.rejected:
        lines.append("\nrejected:")
        lines += [f"  - {_label(item['plan'])}: {item['reason']}" for item in plan.rejected]
    return "\n".join(lines)


def cmd_inventory(argv: list[str]) -> int:
    parser = ArgParser(prog="ftlaunch inventory",
                                     description="Show the GPUs, nodes and host resources ftlaunch sees.")
    parser.add_argument("--inventory", help="a what-if spec to parse instead, e.g. 4x8xH100-80GB")
    parser.add_argument("--hostfile", help="a DeepSpeed hostfile: its nodes and slots (GPUs probed here)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from launcher.inventory import detect_inventory

    inventory = detect_inventory(args.inventory, hostfile=args.hostfile)
    if args.json:
        print(json.dumps(inventory.to_json(), indent=2, default=list))
        return 0
    lines = [f"{inventory.describe()}: world size {inventory.world_size}, device {inventory.device}"]
    for index, gpu in enumerate(inventory.local_gpus):
        free = f", {fmt_bytes(gpu.free_bytes)} free" if gpu.free_bytes is not None else ""
        lines.append(f"  gpu {index}: {gpu.name}, {fmt_bytes(gpu.total_bytes)}{free}, compute capability "
                     f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}")
    if inventory.hostnames:
        lines.append(f"  hosts: {', '.join(inventory.hostnames)}")
    lines.append(f"  host RAM {fmt_bytes(inventory.host_ram_bytes)} per node"
                 + (f" ({fmt_bytes(inventory.host_free_bytes)} available)" if inventory.host_free_bytes else "")
                 + (f", {inventory.cpu_count} CPUs" if inventory.cpu_count else "")
                 + (f", /dev/shm {fmt_bytes(inventory.shm_bytes)}" if inventory.shm_bytes else ""))
    lines += [f"  note: {note}" for note in inventory.notes]
    print("\n".join(lines))
    return 0
