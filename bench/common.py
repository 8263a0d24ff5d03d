"""Helpers the benchmark scripts share: environment, fresh-subprocess workers, random-weight models of a card's
shape, synthetic data, ftlaunch's own trainer path for a pinned plan, step timing and peak memory.

Nothing here downloads anything: models are built from `launcher/shapes.py` card values with random weights and
saved to a local directory once (then loaded through `from_pretrained`, which is where NF4 quantisation happens,
exactly as in a real QLoRA run); data is synthetic text whose token count is known in advance.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1024 ** 3
RESULT_TAG = "BENCH_RESULT "
GOAL_MISSED = 4  # exit status of a GPU script whose rows all ran but missed a goal (1: a row failed)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1",
               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# ftlaunch's recipe for each method the GPU benchmarks measure.
RECIPES = {"full": "sft_7b", "lora": "lora_7b", "qlora": "qlora_7b"}
# Tiny shapes for the CPU code-path checks (`tiny_shape` overrides, by name).
TINY_SHAPES = {"tiny-256": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 4096},
               "tiny-512": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                            "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8192},
               "tiny-llama": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}}


def setup_env() -> None:
    """Offline, quiet. Call before importing transformers/trl/datasets."""
    import warnings

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def quiet_libraries() -> None:
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def bench_cache() -> Path:
    """Where random-weight model directories live (they are big for 7B: ~13 GiB in bf16)."""
    from recipes.builder import cache_dir

    root = os.environ.get("FTLAUNCH_BENCH_CACHE")
    if root:
        return Path(root)
    return cache_dir() / "bench-models"


def shape_of(card: str):
    """A card's shape (launcher/shapes.py), or one of TINY_SHAPES by name."""
    from launcher.shapes import resolve_shape, tiny_shape

    if card in TINY_SHAPES:
        return tiny_shape(TINY_SHAPES[card], card)
    return resolve_shape(card)


# ---- machine description -------------------------------------------------------------------------------------------

def machine() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
        else:
            info["device"] = f"CPU ({os.cpu_count()} cores, no GPU)"
    except ImportError:
        info["device"] = "?"
    for pkg in ("transformers", "trl", "peft", "bitsandbytes"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - reporting only
            info[pkg] = "missing"
    return info


def print_header(title: str) -> None:
    info = machine()
    print(f"== {title}")
    print(f"   date {info['date']} | device {info['device']} | load avg (1 min) {info.get('load_avg_1m', '?')} | "
          f"torch {info.get('torch')} transformers {info.get('transformers')} trl {info.get('trl')} "
          f"peft {info.get('peft')} bitsandbytes {info.get('bitsandbytes')}")
    print(f"   command: {' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}")


# ---- fresh-subprocess workers --------------------------------------------------------------------------------------

def emit(result: dict) -> None:
    """A worker's last word: one tagged JSON line on stdout."""
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


def run_worker(argv: list, env: Optional[dict] = None, timeout: float = 3600) -> dict:
    """Run `python ARGV` in a fresh process; return its tagged JSON result (+ wall_s), or {'error': tail}."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out.setdefault("wall_s", wall)
            return out
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    return {"error": f"exit {proc.returncode}: " + "\n".join(tail), "wall_s": wall}


# ---- models of a card's shape with random weights ------------------------------------------------------------------

def hf_config(shape, max_positions: int = 4096, tokenizer=None):
    """transformers config with the card's sizes: Qwen2Config when q/k/v carry biases, else LlamaConfig."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                  tie_word_embeddings=shape.tied_embeddings, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-6)
    if shape.head_dim:
        common["head_dim"] = shape.head_dim
    if tokenizer is not None:
        common.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    if shape.attention_bias:
        return Qwen2Config(**common)
    return LlamaConfig(attention_bias=False, **common)


def random_model_dir(shape, max_positions: int = 4096, dtype: str = "bfloat16", seed: int = 0,
                     scorer: bool = False) -> Path:
    """Save a random-weight model of `shape` (+ the tiny byte-level tokenizer) once; return its directory.
    `scorer`: a sequence classifier with one output instead (a reward model's layout, for PPO).

    Built on the GPU when there is one (seconds for 7B), in `dtype`; loading it back with a BitsAndBytesConfig
    quantises to NF4 on load, the path a real QLoRA run takes. The tiny tokenizer's 512 ids are all < vocab, so
    any text tokenises to valid ids; its digits are one token each, which makes token counts exact.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from recipes.builder import _publish_dir
    from recipes.tiny import tiny_tokenizer

    key = hashlib.sha256(json.dumps([shape.to_json(), max_positions, dtype, seed, 1] + (["scorer"] if scorer else []),
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = (Path(str(shape.name)).name.replace("/", "_") or "model") + ("-scorer" if scorer else "")
    final = bench_cache() / f"{name}-{key}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}"
    tokenizer = tiny_tokenizer()
    config = hf_config(shape, max_positions, tokenizer)
    if scorer:
        config.num_labels = 1
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    auto_class = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    with torch.device(device):
        model = auto_class.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    _publish_dir(tmp, final)  # another process may have published it first
    return final


def digit_text_file(path: Path, rows: int, tokens: int, seed: int = 0) -> Path:
    """JSONL {'text': ...} rows of random digits, each row longer than `tokens` tokens with the tiny tokenizer
    (one token per digit), so after truncation at max_length=`tokens` every row is exactly `tokens` tokens long:
    tokens per optimizer step = global batch x seq, no padding."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rng.choice("0123456789") for _ in range(tokens + 8))}) + "\n")
    return path


# ---- ftlaunch's own trainer for a (possibly pinned, possibly what-if) plan -----------------------------------------

def ftlaunch_plan(recipe: str, overrides: list, inventory, training: Optional[dict] = None,
                 cpu_fallbacks: bool = False):
    """ftlaunch's planning step: recipe + overrides (+ `training` keys) -> plan(inventory). Returns
    (plan, request, cfg).

    `cpu_fallbacks` (the sweeps' setting, for their --tiny CPU checks): on a CPU inventory plan in the model's own
    dtype (CPU plans are fp32; the 7b recipes pin bfloat16 for GPUs) and, for QLoRA without an `optim` given,
    with adamw_torch (bitsandbytes runs the recipe's paged_adamw_8bit unpaged on a CPU, a path no GPU takes; the
    rows say which optimizer ran).
    """
    from launcher.config import load_recipe
    from launcher.planner import plan as make_plan
    from launcher.recipe_request import request_from_recipe

    overrides, training = list(overrides), dict(training or {})
    if cpu_fallbacks and inventory.gpu is None:
        overrides.append("model.dtype=auto")
        if recipe.startswith("qlora") and "optim" not in training:
            training["optim"] = "adamw_torch"
    cfg = load_recipe(recipe, None, overrides)
    cfg.training.update(training)
    request = request_from_recipe(cfg)
    return make_plan(request, inventory, request.shape), request, cfg


def ftlaunch_trainer(recipe: str, overrides: list, inventory, out_dir, training: Optional[dict] = None,
                     force: bool = False, cpu_fallbacks: bool = False):
    """What `ftlaunch run` builds, minus manifest/callbacks: `ftlaunch_plan` -> the recipe module's trainer (its
    TrainingArguments from the plan, its model loader, its data loader).

    `inventory` may be a what-if (e.g. the plan for a 24 GB card executed on a bigger one). Returns
    (trainer, plan, request, cfg). Single process, no DeepSpeed (ZeRO-0), like `ftlaunch run` without a launcher.
    A plan predicted not to fit gives trainer None, unless `force` (sweeps measure those too: the pinned
    configuration is then the plan's, exactly as pinned).
    """
    import importlib

    from launcher.train import DistEnv, RunContext
    from recipes import common as recipe_common

    plan, request, cfg = ftlaunch_plan(recipe, [f"output_dir={out_dir}", *overrides], inventory, training,
                                       cpu_fallbacks)
    if not plan.fits and not force:
        return None, plan, request, cfg
    ctx = RunContext(cfg=cfg, plan=plan, env=DistEnv(), ds_config=None, output_dir=Path(out_dir))
    module = importlib.import_module(f"recipes.{cfg.method}")
    recipe_common.seed_everything(cfg.seed)
    trainer, _ = module.build(ctx)
    return trainer, plan, request, cfg


def data_overrides(data_path, seq: int, rows: int) -> list:
    return [f"data.source={data_path}", "data.format=text", "data.eval_ratio=0", f"data.max_length={seq}",
            f"data.num_examples={rows}", "eval.num_examples=0"]


# Bench runs write nothing but their figures (the GPU image has no tensorboard) and log every step.
BENCH_TRAINING = {"report_to": [], "save_strategy": "no", "logging_steps": 1}


# ---- measuring -------------------------------------------------------------------------------------------------------

def step_timer(warmup: int = 1):
    """A TrainerCallback recording each optimizer step's wall time (CUDA synchronised); steps after `warmup`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self._last = [], [], None

        @staticmethod
        def _now():
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self._last = self._now()

        def on_step_end(self, args, state, control, **kw):
            now = self._now()
            self.times.append(now - self._last)
            self._last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def seconds_per_step(self) -> Optional[float]:
            kept = self.times[warmup:] or self.times
            return statistics.median(kept) if kept else None

    return StepTimer()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """CUDA allocator peaks when on a GPU; always the process's max RSS (ru_maxrss) too."""
    import resource

    import torch

    out = {"max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out.update(max_allocated=torch.cuda.max_memory_allocated(), max_reserved=torch.cuda.max_memory_reserved())
    return out


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def gib(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def print_table(rows: list, columns: list) -> None:
    """columns: [(header, key or callable)]; right-aligned text table."""
    cells = [[h for h, _ in columns]]
    for row in rows:
        line = []
        for _, key in columns:
            value = key(row) if callable(key) else row.get(key)
            line.append("-" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def print_row(row: dict) -> None:
    """Each finished row at once, as JSON: a run stopped by its deadline (bench/gpu_session.sh) keeps its figures."""
    print("   row " + json.dumps(row, default=str), flush=True)


def inventory_here():
    """What `ftlaunch run` would detect for one process: this GPU, or CPU ranks."""
    from launcher.inventory import detect_inventory

    return detect_inventory(None, {**os.environ, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})


@contextlib.contextmanager
def metered(result: dict):
    """Around one row's build + training: an exception becomes the row's `error` ("OOM: " first when it is one)
    instead of propagating; the process's peak memory is added to `result` either way."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - one row
        result["error"] = ("OOM: " if is_oom(exc) else "") + f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        result.update(peak_memory())


def train_timed(trainer, tokens_per_step: int, warmup: int) -> dict:
    """Train with a step timer: steps, median seconds/step after `warmup`, tokens/s, the logged losses."""
    timer = step_timer(warmup=warmup)
    trainer.add_callback(timer)
    trainer.train()
    seconds = timer.seconds_per_step()
    return {"steps": trainer.state.global_step, "seconds_per_step": seconds,
            "tokens_per_s": tokens_per_step / seconds if seconds else None, "losses": timer.losses}


def pinned_run(recipe: str, model_dir, data, *, seq: int, micro: int, global_batch: int, checkpointing: bool,
               steps: int, warmup: int = 1, inventory=None, overrides=(), training=None,
               live_tensors: bool = False) -> dict:
    """One ftlaunch run (in this process) with the plan pinned to ZeRO-0, `micro` and `checkpointing`: the planner's
    prediction for exactly that configuration (`estimate`), then a few optimizer steps, timed and metered.

    `inventory` (default: this machine) may be a what-if GPU: on a CPU the run then executes the GPU plan (its
    precision and dtypes); `live_tensors` adds the CPU's live-tensor peak (bench/tensor_meter.py) as `live_peak`."""
    from launcher.planner import estimate

    reset_peak()
    inventory = inventory or inventory_here()
    overrides = [f"model.name={model_dir}", f"plan.global_batch_size={global_batch}",
                 f"plan.micro_batch_size={micro}", f"plan.gradient_checkpointing={str(checkpointing).lower()}",
                 "plan.zero_stage=0", "plan.offload=none", *data_overrides(data, seq, global_batch * steps),
                 *overrides]
    result: dict = {}
    with metered(result):
        trainer, _, request, cfg = ftlaunch_trainer(recipe, overrides, inventory, scratch_dir("bench-run-"),
                                                    dict(BENCH_TRAINING, max_steps=steps, **(training or {})),
                                                    force=True, cpu_fallbacks=True)
        pred = estimate(request, inventory, request.shape, zero_stage=0, offload="none",
                        gradient_checkpointing=checkpointing, micro_batch_size=micro)
        result.update(predicted=pred["per_gpu_bytes"], predicted_fits=bool(pred["fits"]),
                      predicted_step_seconds=pred["step_seconds"], optim=cfg.training.get("optim") or "adamw_torch")
        from bench.tensor_meter import LiveTensorMeter

        meter = LiveTensorMeter() if live_tensors else contextlib.nullcontext()
        with meter:
            result.update(train_timed(trainer, global_batch * seq, warmup))
        if live_tensors:
            result.update(live_start=meter.start, live_peak=meter.peak)
    return result


def scratch_dir(prefix: str) -> str:
    """A fresh temporary directory that is removed when this process exits (FTLAUNCH_BENCH_KEEP=1 keeps it, to look
    inside). Every benchmark's outputs and data go in one: a benchmark leaves nothing behind, on a 64 GiB GPU disk
    or in CI's /tmp, run after run."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    if os.environ.get("FTLAUNCH_BENCH_KEEP") != "1":
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
