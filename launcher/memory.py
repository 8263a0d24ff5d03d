"""Bytes per rank for one training configuration. Pure arithmetic on ModelShape; no torch.

Sources of the formulas:
- model states: ZeRO (Rajbhandari et al. 2020, "2Ψ + 2Ψ + KΨ") as DeepSpeed itself estimates them in
  `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (stage_1_and_2.py, stage3.py):
  16-bit params 2 B, 16-bit grads 2 B, fp32 grads 4 B, fp32 master 4 B, Adam 8 B; ZeRO-3 also holds the largest
  layer gathered (4 B/param); offloaded host states carry a 1.5x buffer factor. tests/test_planner.py checks this
  file against those functions, and where they differ from the code they estimate: the fp32 gradients exist only
  inside the optimizer step, after backward has freed the activations, and ZeRO-3 keeps a 16-bit gradient partition.
- activations: in the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation", §4.1), but counted
  from what HF's Llama/Qwen2 blocks, PEFT and bitsandbytes actually save for backward (listed with saved-tensor
  hooks; `activation_bytes` says what). The s² attention matrices only with eager attention (SDPA/flash keep none).
  Full recompute keeps each layer's input plus one layer's activations.
- logits: b·s·V in 16-bit, the fp32 upcast HF's loss makes, and its fp32 gradient / log-softmax (DPO, and GRPO over
  the completion only: 16 B per logit); or, under TRL's SFTTrainer (`loss_type="chunked_nll"`, its default),
  256-token chunks computed from copies of the lm_head weight.
- rollouts: PPO/GRPO sequences are prompt + generated tokens; GRPO samples the rank's whole batch at once (KV
  cache); TRL's PPO keeps fp32 sampling logits of the whole rollout (`ppo_rollout_bytes`) and trains policy and
  value model in one backward.
- A full fine-tune in one process without DeepSpeed trains the weights in the dtype they load in.
The chunk, DPO, GRPO and PPO terms were measured as live tensor bytes (`bench/memory_accuracy.py --cpu`, which checks
the whole model that way on 27 configurations); the CUDA dropout mask (a byte per element, torch's fused dropout)
and GRPO's and PPO's KV caches (small next to training on those shapes) were not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from launcher.shapes import ModelShape

GiB = 1024 ** 3
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # plan precision -> torch dtype name
NF4_DOUBLE_QUANT_BYTES = 0.516  # 4-bit weights + 8-bit block scales (blocks of 64) + second-level scales
OFFLOAD_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for pinned host buffers
CUDA_RUNTIME_BYTES = 1 * GiB  # CUDA context, cuBLAS workspaces, NCCL buffers
CPU_RUNTIME_BYTES = 1 * GiB  # python + torch + transformers resident set of a CPU rank
HOST_PROCESS_BYTES = 2 * GiB  # host RAM every GPU rank's process needs besides offloaded states
FRAGMENTATION = 0.05  # caching-allocator margin on top of what tensors need
SFT_LOSS_CHUNK_TOKENS = 256  # TRL SFTTrainer's chunked_nll: tokens per lm_head + cross-entropy chunk
# TRL DPOTrainer (1.12) keeps the logits in fp32 for its per-token log-prob gather, and its backward holds three
# more fp32 copies at once (the gathered gradient's stack, zeros and scatter_add): 16 B per logit, measured.
DPO_LOGIT_BYTES = 16
# TRL GRPOTrainer (1.12) the same on the completion's logits: the fp32 logits / temperature stay saved for
# selective_log_softmax, whose backward holds the same three fp32 copies (traced live: div, stack, zeros,
# scatter_add, each b x completion x V).
GRPO_LOGIT_BYTES = 16
LOAD_SHARD_BYTES = 5 * GiB  # from_pretrained materialises one safetensors shard at a time when it can
BUCKET_CAP = 200_000_000  # elements; DeepSpeed's reduce/allgather buckets, sized hidden² like HF's "auto"

# Optimizer state bytes per trainable parameter (without the fp32 master copy), by HF `optim` name. bitsandbytes'
# 8-bit states are blockwise: one uint8 per element and state, plus an fp32 absmax per 256-element block and state.
BNB_BLOCK = 256
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adam": 8.0, "8bit": 2.0 + 2 * 4 / BNB_BLOCK, "lion": 4.0,
                         "lion_8bit": 1.0 + 4 / BNB_BLOCK, "adafactor": 0.5, "sgd": 0.0, "rmsprop": 4.0,
                         "adagrad": 4.0}
LORA_ALIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "dense": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj", "fc1": "up_proj", "fc2": "down_proj"}


def optimizer_state_bytes(optim: str, param_bytes: int = 4) -> float:
    """HF `optim` name -> state bytes per param: adamw_torch 8, adamw_8bit / paged_adamw_8bit 2 (+ absmax), paged
    32-bit 8.

    torch's optimizers keep their states in the parameter's dtype: 16-bit parameters (a full fine-tune without
    DeepSpeed) halve them; 8-bit optimizers quantise whatever the parameter is."""
    name = (optim or "adamw_torch").lower()
    if "8bit" in name:  # bitsandbytes', torchao's (adamw_torch_8bit) and GaLore's alike: one byte per state
        return OPTIMIZER_STATE_BYTES["lion_8bit" if _one_state(name) else "8bit"]
    scale = param_bytes / 4
    if "lion" in name:
        return OPTIMIZER_STATE_BYTES["lion"] * scale
    for key in ("adafactor", "sgd", "rmsprop", "adagrad", "adam"):
        if key in name:
            return OPTIMIZER_STATE_BYTES[key] * scale
    return OPTIMIZER_STATE_BYTES["adamw"] * scale  # unknown names: assume Adam-like, the common worst case


def _one_state(name: str) -> bool:
    return "lion" in name or "rmsprop" in name


def is_bnb_8bit(optim: str) -> bool:
    """HF `optim` names that build a bitsandbytes 8-bit optimizer (not torchao's adamw_torch_8bit, not GaLore's)."""
    name = (optim or "").lower()
    return "8bit" in name and not name.startswith(("adamw_torch", "galore"))


def with_embedding_states(state_bytes: float, optim: str, trainable: float, embedding_params: int) -> float:
    """State bytes per parameter of a model whose embedding trains. Under a bitsandbytes 8-bit optimizer the HF
    Trainer registers every nn.Embedding for 32-bit states (Trainer.create_optimizer, for stability), so the
    vocab x hidden embedding keeps fp32 states (8 B per parameter for Adam, 4 for Lion and RMSprop) beside
    everyone else's 8-bit ones. Measured on live tensors: bench/RESULTS.md (0.5B full fine-tune, +0.76 GiB).
    Only where the optimizer holds the model's own parameters (one plain process, or DeepSpeed's stage 0 in fp32):
    the override is matched by parameter identity, and DeepSpeed's ZeRO and mixed-precision optimizers hand it flat
    fp32 partitions instead, so under them every state is 8-bit."""
    name = (optim or "").lower()
    if not is_bnb_8bit(name) or trainable <= 0:
        return state_bytes
    embedding = min(embedding_params, trainable)
    fp32 = OPTIMIZER_STATE_BYTES["lion" if _one_state(name) else "adamw"]
    return (state_bytes * (trainable - embedding) + fp32 * embedding) / trainable


def load_dtype(model_dtype: str, precision: str, full_single_process: bool) -> str:
    """The dtype a trained model loads in (recipes/builder.py loads it so): `model.dtype`, or "auto" = the plan's
    precision. A full fine-tune in one process without DeepSpeed trains the weights in that dtype, as torchtune's
    single-device recipes do in bf16; fp16 weights cannot train that way (HF's grad scaler refuses fp16 gradients),
    so they load in fp32 and autocast computes in fp16."""
    dtype = model_dtype if model_dtype not in (None, "auto") else \
        PRECISION_DTYPES.get(precision, "float32")
    if dtype == "float16" and full_single_process:
        return "float32"
    return dtype


def lora_modules(shape: ModelShape, targets: Union[str, list, tuple, None]) -> dict[str, tuple[int, int]]:
    """The block's linear layers LoRA wraps. 'all-linear' = q,k,v,o,gate,up,down (PEFT excludes lm_head)."""
    shapes = shape.linear_shapes()
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return shapes
    names = [targets] if isinstance(targets, str) else list(targets)
    chosen = {}
    for name in names:
        key = LORA_ALIASES.get(name, name)
        # Unknown module names cost like a square hidden x hidden layer: small next to the base, never zero.
        chosen[key] = shapes.get(key, (shape.hidden, shape.hidden))
    return chosen


def lora_params(shape: ModelShape, r: int, targets) -> int:
    """LoRA adds A (r x in) and B (out x r) per wrapped layer per block."""
    return shape.layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in lora_modules(shape, targets).values())


def frozen_weight_bytes(shape: ModelShape, params: int, element_bytes: int, quantized: bool) -> float:
    """Frozen base weights: 16-bit (or fp32 on CPU), or NF4 for the block linears under QLoRA.

    Only the decoder blocks' linears are 4-bit; PEFT's prepare_model_for_kbit_training (which QLoRA runs) upcasts
    the rest (embeddings, lm_head, norms) to fp32.
    """
    if not quantized:
        return params * element_bytes
    linear = shape.layers * shape.linear_params_per_layer
    return linear * NF4_DOUBLE_QUANT_BYTES + (params - linear) * 4


@dataclass
class ModelStates:
    """One model's share on one rank, plus what it parks in host RAM (per rank, before the buffer factor)."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    host: float = 0.0
    step_gradients: float = 0.0  # fp32 gradients (+ the optimizer's temporaries) only inside the optimizer step
    gathered: float = 0.0  # of `weights`, ZeRO-3's gathered copies, released before the optimizer step

    def __add__(self, other: "ModelStates") -> "ModelStates":
        return ModelStates(self.weights + other.weights, self.gradients + other.gradients,
                           self.optimizer + other.optimizer, self.host + other.host,
                           self.step_gradients + other.step_gradients, self.gathered + other.gathered)

    @property
    def gpu(self) -> float:
        return self.weights + self.gradients + self.optimizer


# ds_config's stage3_max_reuse_distance and stage3_max_live_parameters (HF's "auto" values, DeepSpeed's defaults)
STAGE3_REUSE_NUMEL = 1_000_000_000
STAGE3_SUB_GROUP_NUMEL = 1_000_000_000  # DeepSpeed's default sub_group_size: ZeRO-3 steps its partition in such groups


def zero3_gathered_bytes(model_bytes: float, largest_layer: int, element_bytes: int, backward: bool) -> float:
    """Weights ZeRO-3 holds gathered at once (plus, for a model that runs backward, one layer's 16-bit grads).

    After a module runs, DeepSpeed keeps every parameter whose next use lies within stage3_max_reuse_distance
    elements of the modules still ahead in this step's trace (partitioned_param_coordinator.py,
    __params_to_release). A model that runs backward reuses each layer after the rest of the forward and as much
    backward: around the turn its last layers stay gathered, up to half that distance (the whole model below ~0.5B
    parameters). A forward-only model (a frozen reward or reference model) reuses nothing within its trace: one layer
    at a time. `model_bytes`: the model as stored (16-bit weights; 4-bit ones packed into 16-bit storage under
    ZeRO-3); `element_bytes`: that storage's."""
    if not backward:
        return min(model_bytes, element_bytes * largest_layer)
    return min(model_bytes, element_bytes * (STAGE3_REUSE_NUMEL // 2 + largest_layer)) + 2 * largest_layer


def optimizer_step_temp_bytes(optim: str) -> float:
    """Bytes per stepped parameter that the optimizer allocates inside its step: torch's non-fused Adam(W) makes
    sqrt(exp_avg_sq) as a new fp32 tensor (torch/optim/adam.py, _foreach_sqrt / .sqrt()), the whole of a ZeRO flat
    partition at once; fused, 8-bit and factored optimizers update in place."""
    name = (optim or "adamw_torch").lower()
    return 4.0 if name in ("adamw_torch", "adamw_hf", "adamw_torch_xla") else 0.0


def model_states(*, trainable: int, frozen_bytes: float, precision: str, state_bytes: float, zero_stage: int,
                 dp: int, offload_optimizer: bool = False, offload_param: bool = False,
                 largest_layer: int = 0, deepspeed: bool = True, param_bytes: int = 4,
                 gathered: Optional[float] = None, step_temp_bytes: float = 0.0) -> ModelStates:
    """ZeRO partitioning of one model over `dp` data-parallel ranks.

    stage 1 splits master weights + optimizer states, stage 2 also gradients, stage 3 also the 16-bit weights
    (frozen ones too, as TRL's prepare_deepspeed does with frozen models under ZeRO-3).
    `deepspeed=False` is a single process under torch autocast: trainable weights and grads in `param_bytes` (4 for
    PEFT's adapters, which it keeps fp32 over a 16-bit base; the load dtype for a full fine-tune), no master copy;
    `state_bytes` is then already for that dtype (`optimizer_state_bytes(optim, param_bytes)`).
    `gathered`: ZeRO-3's gathered weights (zero3_gathered_bytes); None = DeepSpeed's own estimate, 4 B x largest layer.
    `step_temp_bytes`: per stepped fp32 parameter, what the optimizer allocates in its step (optimizer_step_temp_bytes;
    one plain process: 0 on CPUs, where torch's for-loop AdamW makes it one tensor at a time).
    """
    e = ELEMENT_BYTES[precision]
    mixed = e == 2
    if not deepspeed:  # torch's foreach AdamW (CUDA's default) makes its temporary in the states' dtype, all at once
        return ModelStates(trainable * param_bytes + frozen_bytes, trainable * param_bytes, trainable * state_bytes,
                           0.0, trainable * step_temp_bytes * param_bytes / 4)
    weight16 = trainable * e
    split = max(1, dp)
    # Gradients in the model's dtype live from backward to the step (ZeRO-2: the rank's partition; ZeRO-3: its
    # grad_partitions_flat_buffer, stage3.py). The fp32 copy the optimizer steps on exists only inside the step, once
    # backward has freed the activations (peak.py takes whichever moment is larger): ZeRO-1/2/3 make it for the
    # rank's partition (stage_1_and_2.py step(); stage3.py _prepare_fp32_grad_for_sub_group, one sub-group at a
    # time); ZeRO-0's 16-bit wrapper for a torch optimizer (FP16_UnfusedOptimizer, also for bf16) one per parameter.
    grads = trainable * e
    if zero_stage >= 1:
        stepped = min(trainable / split, STAGE3_SUB_GROUP_NUMEL) if zero_stage == 3 else trainable / split
    else:
        stepped = trainable if mixed else 0.0  # fp32 without ZeRO: the optimizer steps the parameters themselves
    step_grads = stepped * (4 + step_temp_bytes)
    optim = trainable * ((4 if mixed else 0) + state_bytes)  # fp32 master copy only with mixed precision
    if zero_stage >= 1:
        optim /= split
    if zero_stage >= 2:
        grads /= split
    if zero_stage == 3:
        weights = (weight16 + frozen_bytes) / split
        if gathered is None:
            gathered = 4 * largest_layer  # the gathered layer (16-bit params + grads), DeepSpeed's largest_layer_memory
        weights += gathered
    else:
        weights, gathered = weight16 + frozen_bytes, 0.0
    host = 0.0
    if offload_optimizer and trainable:
        # Master weights, optimizer states and the fp32 gradient partition live on the host; under ZeRO-2/3 the
        # 16-bit grads only stream through the buckets (counted in "other"), ZeRO-1 keeps them whole on the GPU.
        host += optim + trainable * 4 / split
        grads = trainable * 2 if (zero_stage == 1 and mixed) else 0.0
        optim = step_grads = 0.0
    if offload_param and zero_stage == 3:
        host += weights - gathered
        weights = gathered
    return ModelStates(weights, grads, optim, host, step_grads, gathered)


def activation_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, checkpointing: bool,
                     precision: str = "bf16", attention: str = "sdpa", lora_r: int = 0, lora_targets=None,
                     sequences: int = 1, lora_dropout: float = 0.0, device: str = "cuda",
                     trainable_base: bool = False, quantized: bool = False,
                     lora_input_bytes: Optional[int] = None) -> float:
    """Activations kept for backward across the whole model, for one micro-batch (`sequences` per example).

    Per block and token, what autograd saves (listed with saved-tensor hooks on HF Llama/Qwen2 blocks):
    - the two RMSNorms' fp32 upcasts of their input (4 B each, whatever the precision);
    - attention: q, the SDPA output, k, v (16-bit under autocast; eager adds the s² softmax outputs);
    - the gated MLP's gate output, act(gate) and up output (one GELU input for an encoder's MLP), in the dtype of
      the residual stream: fp32 under QLoRA, whose prepare_model_for_kbit_training upcasts embeddings and norms to
      fp32 and whose 4-bit layers return outputs in their input's dtype; 16-bit otherwise;
    - with trainable base weights (full fine-tuning) also every linear's input for its weight gradient: the norms'
      16-bit product inputs and outputs, o_proj's and down_proj's inputs (frozen linears keep none);
    - LoRA: each wrapped layer's input cast to 16-bit (for A's gradient), A's output, and with dropout the mask:
      a bool per element on CUDA (fused dropout), a float noise tensor of PEFT's fp32 upcast on CPU. Without
      autocast (`lora_input_bytes=4`: TRL's PPO in one process) the input copy and A's output are fp32.
    Full recompute keeps each block's input plus one block's activations. Outside the blocks: the embedding output,
    the final norm's upcast and the lm_head input (logits: `logits_bytes`).
    """
    e = ELEMENT_BYTES[precision]
    stream = 4 if quantized else e
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    gated = shape.arch == "decoder"
    per_token = 2 * 4 * h + e * (2 * q + 2 * kv) + stream * (3 * i if gated else i)
    if trainable_base:
        per_token += e * (4 * h + q + i)
    if attention == "eager":
        # per score: HF's eager attention takes the softmax in fp32 (its output is saved), and the matmul with V saves
        # the probabilities cast back to 16-bit (in fp32 the same tensor); no dropout mask at attention_dropout 0.
        # Measured on live tensors (bench/RESULTS.md): ~6 B per score in bf16, not Korthikanti's 5.
        per_token += shape.heads * seq_len * (4 + (e if e != 4 else 0))
    if lora_r:
        modules = lora_modules(shape, lora_targets)
        fan_ins = sum(fan_in for fan_in, _ in modules.values())
        per_token += (lora_input_bytes or e) * (fan_ins + lora_r * len(modules))
        if lora_dropout > 0:
            per_token += fan_ins * (1 if device == "cuda" else 4)
    tokens = seq_len * micro_batch * sequences
    outside = 3 * stream * h * tokens
    if checkpointing:
        return shape.layers * stream * h * tokens + per_token * tokens + outside
    return shape.layers * per_token * tokens + outside


def logits_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, precision: str = "bf16",
                 sequences: int = 1, lm_head: bool = True, chunk_tokens: int = 0,
                 head_bytes: Optional[int] = None, per_logit: Optional[float] = None,
                 logit_tokens: Optional[int] = None) -> float:
    """lm_head output + fp32 upcast for the loss + fp32 grad (`per_logit` bytes per logit where a trainer is known
    to keep more, e.g. DPO_LOGIT_BYTES) over `logit_tokens` of each sequence (default all; GRPO asks the model for
    the completion's logits only); nothing for classification heads.

    `chunk_tokens` (TRL SFTTrainer's chunked_nll): no b·s·V tensor ever exists. Each chunk runs
    `h.float() @ w.float().t()` under checkpointing, so the forward holds an fp32 copy of a 16-bit lm_head weight
    (`head_bytes`, default the precision's; QLoRA's head is fp32 already, 4) and, under 16-bit autocast, the 16-bit
    copy the matmul casts it to, plus one chunk's logits; a chunk's recompute and backward hold the 16-bit weight
    copy and ~12 B per chunk logit (16 B in fp32: logits, log-probs, entropy, grads). The peak is the larger of
    the two; at least one whole chunk runs (TRL pads the count up to a multiple).
    """
    if not lm_head:
        return 0.0
    e = ELEMENT_BYTES[precision]
    if chunk_tokens:
        chunk = chunk_tokens * shape.vocab
        weight = shape.vocab * shape.hidden
        cast16 = weight * e if e == 2 else 0  # autocast's 16-bit copy for the matmul
        upcast = weight * 4 if (head_bytes or e) == 2 else 0  # w.float() of a 16-bit weight
        return max(upcast + cast16 + chunk * e, cast16 + (12 if e == 2 else 16) * chunk)
    per_element = per_logit or (e + 4 + 4 if e == 2 else 8)
    tokens = min(seq_len, logit_tokens or seq_len)
    return tokens * micro_batch * sequences * shape.vocab * per_element


def kv_cache_bytes(shape: ModelShape, *, seq_len: int, micro_batch: int, precision: str = "bf16") -> float:
    """Generation (PPO/GRPO rollouts) keeps K and V of every layer."""
    return 2 * shape.layers * shape.kv_dim * seq_len * micro_batch * ELEMENT_BYTES[precision]


# recipes/ppo.py's local_rollout_forward_batch_size: max(micro-batch, this); TRL samples the rollout in such chunks.
PPO_ROLLOUT_CHUNK = 8


def ppo_rollout_bytes(shape: ModelShape, *, rank_batch: int, micro_batch: int, response_tokens: int,
                      prompt_tokens: int, precision: str = "bf16", chunk: int = 0) -> tuple[float, float]:
    """TRL's PPOTrainer (1.12) keeps generate's fp32 logits of every sampled token of the whole rollout batch
    (`batch_generation` stacks each chunk's scores, pads the chunks into one tensor and returns it; it lives through
    the update). Traced live: while the next rollout is sampled, the previous one's, the new chunks' and the new padded
    tensor coexist. Returns (kept through training, peak while sampling beside the chunk's KV cache).
    `chunk`: local_rollout_forward_batch_size when the recipe sets it."""
    chunk = min(chunk or max(micro_batch, PPO_ROLLOUT_CHUNK), rank_batch)
    rows = -(-rank_batch // chunk) * chunk  # a short last chunk is padded to the chunk size
    kept = rows * response_tokens * shape.vocab * 4
    cache = kv_cache_bytes(shape, seq_len=prompt_tokens + response_tokens, micro_batch=chunk, precision=precision)
    return kept, 3 * kept + cache


def bucket_elements(hidden: int) -> int:
    return int(min(hidden * hidden, BUCKET_CAP))


def runtime_bytes(*, device: str, zero_stage: int, hidden: int, precision: str, dp: int) -> float:
    """Fixed per-rank overhead: runtime + DeepSpeed communication buckets."""
    e = ELEMENT_BYTES[precision]
    fixed = CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    bucket = bucket_elements(hidden) * e
    if zero_stage == 3:
        return fixed + 1.9 * bucket  # prefetch (0.9 h²) + reduce bucket
    if zero_stage in (1, 2) and dp > 1:
        return fixed + 4.5 * 2 * bucket  # overlap_comm keeps ~4.5x the reduce + allgather buckets (DeepSpeed docs)
    return fixed


def host_bytes_per_node(*, ranks_per_node: int, offloaded_per_rank: float, load_per_rank: float) -> float:
    """Host RAM one node needs: processes + max(loading the checkpoint, pinned offloaded states)."""
    offloaded = OFFLOAD_BUFFER_FACTOR * offloaded_per_rank * ranks_per_node
    return ranks_per_node * HOST_PROCESS_BYTES + max(offloaded, load_per_rank * ranks_per_node)


def load_bytes_per_rank(params: int, zero_stage: int, quantized: bool, bytes_per_param: int = 2) -> float:
    """Host bytes while from_pretrained runs: the whole model in its load dtype per rank, or one shard (zero.Init /
    QLoRA)."""
    full = float(bytes_per_param) * params
    return min(full, LOAD_SHARD_BYTES) if (zero_stage == 3 or quantized) else full


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.1f} GiB"
