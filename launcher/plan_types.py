"""What the planner is asked (PlanRequest, with the ExtraModels a method holds) and what it answers (Plan).

Pure data; the search is launcher/planner.py (which re-exports these names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from launcher.shapes import ModelShape

MIN_MEMORY_FRACTION = 0.1  # below it the fixed runtime alone would not fit: a typo, not a plan
# Offload must be predicted this much faster than the fastest plan without it: it costs host RAM, pinned memory and
# PCIe time shared with other jobs, none of which the cost model sees, and its few % are within the model's error.
OFFLOAD_MARGIN = 1.10


@dataclass
class ExtraModel:
    """Another model the recipe holds (PPO: reference, reward, value; DPO: reference)."""

    role: str  # 'reference' | 'reward' | 'value'
    shape: ModelShape
    trainable: bool = False
    quantized: bool = False
    # a whole copy on every rank whatever the stage: a model the recipe runs itself (GRPO's reward model behind a
    # reward function), which DeepSpeed never sees; TRL's own frozen models follow the stage (prepare_deepspeed)
    replicated: bool = False


@dataclass
class PlanRequest:
    shape: Optional[ModelShape] = None
    method: str = "full"  # 'full' | 'lora' | 'qlora'
    seq_len: int = 2048  # tokens per sequence; PPO/GRPO: prompt + generated_tokens
    global_batch_size: int = 16
    lora_r: int = 16
    lora_targets: object = "all-linear"
    trainable_params: Optional[int] = None  # overrides the LoRA count (prompt / prefix tuning)
    optimizer: str = "adamw_torch"  # HF `optim` name
    zero_stage: Optional[int] = None  # pins; None = search
    offload: Optional[str] = None
    micro_batch_size: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    memory_fraction: float = 0.9  # of each GPU's capacity the plan may fill, in [MIN_MEMORY_FRACTION, 1]
    attention: str = "sdpa"  # 'sdpa' (also flash) | 'eager'
    extra_models: list = field(default_factory=list)
    lora_dropout: float = 0.0
    loss_chunk_tokens: int = 0  # TRL SFTTrainer's chunked_nll (mem.SFT_LOSS_CHUNK_TOKENS); 0 = whole logits
    logit_bytes: Optional[float] = None  # whole logits: bytes per logit at the loss's peak (None: 16-bit + 2 x fp32)
    weight_dtype: str = "auto"  # model.dtype: what a full fine-tune in one process trains in ("auto" = precision)
    deepspeed: bool = False  # a launcher started the run: DeepSpeed's engine trains it even on one rank at ZeRO-0
    sequences_per_example: int = 1  # 2 for preference pairs (DPO, reward modelling)
    generates: bool = False  # PPO/GRPO rollouts keep a KV cache
    generated_tokens: int = 0  # PPO/GRPO: tokens sampled per sequence (part of seq_len)
    generates_rank_batch: bool = False  # GRPO samples the rank's whole batch (micro x accumulation) in one call
    logit_tokens: Optional[int] = None  # tokens per sequence the loss takes logits of (GRPO: the completion)
    keeps_rollout_logits: bool = False  # PPO: TRL keeps fp32 logits of every sampled token (memory.ppo_rollout_bytes)
    rollout_chunk: int = 0  # PPO's local_rollout_forward_batch_size; 0: the recipe's max(rows, PPO_ROLLOUT_CHUNK)
    # PPO's num_mini_batches k: TRL's loop makes one optimizer step per mini-batch (per-rank batch / k rows, one
    # backward) only without accumulation, as its Accelerator accumulates over whole rollout batches; so k > 1 pins
    # micro-batch = the per-rank batch, accumulation 1, and each backward takes micro / k rows (`train_rows`)
    mini_batches: int = 1
    # False where the trainer runs without autocast: TRL's PPOTrainer builds its own Accelerator (mixed precision
    # "no"), so in one process the 16-bit model computes in 16-bit and PEFT's fp32 adapters in fp32
    autocast: bool = True
    # TRL's SFT/DPO/GRPO/reward trainers (1.12) convert the adapters of a 4-bit model to bf16 (QLoRA paper, §3)
    quantized_adapter_bytes: int = 4
    notes: list = field(default_factory=list)
    # pins ftlaunch set itself, not the user: a run's second plan keeps the first's stage and offload, a resuming run
    # its checkpoint's stage (a note says which)
    kept: tuple = ()


@dataclass
class Plan:
    fits: bool
    reason: str
    method: str
    device: str
    precision: str
    world_size: int
    nodes: int
    gpus_per_node: int
    seq_len: int
    global_batch_size: int
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    zero_hpz_partition_size: Optional[int] = None
    bnb_4bit_quant_storage: Optional[str] = None
    per_gpu_bytes: dict = field(default_factory=dict)
    capacity_bytes: int = 0
    usable_bytes: int = 0
    host_bytes_per_node: int = 0
    load_bytes_per_rank: int = 0  # host RAM one rank needs while from_pretrained loads its models (all of them)
    host_capacity_bytes: Optional[int] = None
    predicted_step_seconds: Optional[float] = None
    model: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    bucket_elements: int = 0
    hidden_size: int = 0
    single_process: bool = False  # one plain process, no DeepSpeed engine: HF (+ torch autocast) alone
    peak_at: str = "backward"  # the moment per_gpu_bytes describes: backward, rollout or optimizer step

    @property
    def offload(self) -> str:
        return "all" if self.offload_param else "optimizer" if self.offload_optimizer else "none"

    def to_json(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["offload"] = self.offload
        return out
