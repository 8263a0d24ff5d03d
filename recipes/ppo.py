"""PPO (RLHF): TRL's experimental PPOTrainer with four models: policy, reference, reward and value.

    model.name: tiny | a hub id | the SFT stage's output (a full model, or an adapter dir: merged into its base)
    ppo:
      reward_model: runs/rm_tiny    # an rm run's output (full model or LoRA adapter); required
      value_model: null             # defaults to reward_model (the critic starts from the reward model)
      response_length: 8            # new tokens per rollout
      num_ppo_epochs: 4
      num_mini_batches: 1           # > 1: one optimizer step per mini-batch, so the planner pins accumulation 1
      kl_coef: 0.05
      temperature: 0.7
      missing_eos_penalty: 1.0      # subtracted from the score of rollouts that never stop
      cliprange: 0.2
      vf_coef: 0.1
      whiten_rewards: false

With adapters (peft.method lora/dora) the reference is the policy with its adapter disabled (`ref_model=None`): no
second copy. Full fine-tuning loads a frozen reference copy. `training.max_steps` counts PPO updates (one rollout
batch of `plan.global_batch_size` prompts each). The policy is saved (adapter or full model) to the output directory.

Reports the mean reward-model score of greedy answers to held-out prompts before and after (plus exact-match
accuracy and the `arith` reward on synthetic tasks), the KL to the reference, and the training reward curve.
"""
from __future__ import annotations

import os
import sys

from launcher.errors import UserError
from launcher.memory import PPO_ROLLOUT_CHUNK  # the planner sizes the rollout with the same chunk
from launcher.recipe_request import generated_tokens
from recipes import builder, common, rewards

# TRL's PPOTrainer has no resume: launcher/train.py neither checks nor converts a checkpoint, and a preemption
# warning stops the run with the policy so far saved as its result (a requeue would start again from scratch)
RESUMES = False
# TRL warns on every import of trl.experimental (the runner imports PPOConfig to check training.* keys first)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

DATA_KIND = "prompts"
ARGS_CLASS = "trl.experimental.ppo:PPOConfig"  # its TrainingArguments class (checked before a run starts)


def scorer_paths(cfg) -> tuple[str, str]:
    """(reward model, value model) as full-model directories; missing paths fail naming the field."""
    from transformers import AutoModelForSequenceClassification

    section = cfg.section("ppo")
    reward = section.get("reward_model")
    if not reward or not isinstance(reward, str):
        raise UserError("ppo.reward_model: PPO needs a reward model; set ppo.reward_model to a trained rm output dir")
    value = section.get("value_model") or reward
    if not isinstance(value, str):
        raise UserError(f"ppo.value_model: expected a path or hub id, got {value!r}")
    resolved = []
    for field, name in (("ppo.reward_model", reward), ("ppo.value_model", value)):
        if rewards.looks_like_path(name):
            resolved.append(rewards.full_model_dir(name, field, AutoModelForSequenceClassification, num_labels=1))
        else:
            resolved.append(name)  # a hub id: from_pretrained finds it in the local cache (offline) or fails there
    return resolved[0], resolved[1]


class _LeaveLoop(Exception):
    """Raised at a step's end to leave TRL's PPO loop (see RunnerPPOTrainer)."""


def _ppo_trainer_class():
    from trl.experimental.ppo import PPOTrainer

    class RunnerPPOTrainer(PPOTrainer):
        """PPOTrainer as the runner drives every trainer: `train(resume_from_checkpoint=...)`, `evaluate()`, and a
        `loss` entry in the logs (policy loss + vf_coef x value loss) for the health guard and progress lines."""

        def __init__(self, args, *rest, **kwargs):
            # PPOTrainer builds a bare `Accelerator(gradient_accumulation_steps=...)`, dropping the DeepSpeed plugin
            # that TrainingArguments made from `deepspeed=`: under the deepspeed launcher it then wraps the policy in
            # DDP and fails (`'DistributedDataParallel' object has no attribute 'policy'`). Hand it the plugin, as
            # transformers' Trainer does.
            import functools

            from trl.experimental.ppo import ppo_trainer

            plugin = getattr(args, "deepspeed_plugin", None)
            original = ppo_trainer.Accelerator
            if plugin is not None:
                ppo_trainer.Accelerator = functools.partial(original, deepspeed_plugin=plugin)
            try:
                super().__init__(args, *rest, **kwargs)
            finally:
                ppo_trainer.Accelerator = original
            # TRL's PPO loop never reads `should_training_stop`: leave it when a callback asks (the health guard on
            # a diverged step, a preemption warning), at the step's end, on every rank alike (both decide globally)
            handler, step_end = self.callback_handler, self.callback_handler.on_step_end

            def on_step_end(args, state, control):
                control = step_end(args, state, control)
                if control.should_training_stop and state.global_step < state.max_steps:  # the last step ends anyway
                    raise _LeaveLoop
                return control

            handler.on_step_end = on_step_end

        def train(self, resume_from_checkpoint=None, **kwargs):
            if resume_from_checkpoint and self.accelerator.is_main_process:
                print(f"ftlaunch: PPO cannot resume a checkpoint exactly (TRL's PPOTrainer has no resume); "
                      f"training again from the start instead of {resume_from_checkpoint}", file=sys.stderr)
            try:
                super().train()
            except _LeaveLoop:  # what TRL's loop does after its last step: the callbacks' train end
                self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            return None

        def save_model(self, output_dir=None, _internal_call=False):
            """Save the policy only (adapter or full model). Under DeepSpeed, TRL hands transformers' save_model the
            bare policy as `self.deepspeed`, which then fails (`'LlamaConfig' object has no attribute 'get'`): gather
            the engine's state dict instead (every rank takes part: ZeRO-3 consolidates) and let rank 0 write it."""
            if not self.is_deepspeed_enabled:
                return super().save_model(output_dir, _internal_call)
            output_dir = output_dir or self.args.output_dir
            engine = self.model_wrapped if hasattr(self.model_wrapped, "module") else self.model
            state = self.accelerator.get_state_dict(engine)
            if self.accelerator.is_main_process:
                policy = self.accelerator.unwrap_model(engine).policy
                prefix = "policy."
                policy.save_pretrained(output_dir, safe_serialization=True,
                                       state_dict={k[len(prefix):]: v for k, v in state.items()
                                                   if k.startswith(prefix)})
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
            self.accelerator.wait_for_everyone()

        def evaluate(self, *args, **kwargs) -> dict:
            return {}  # before/after evaluation is the recipe's evaluator (rank 0, fresh models)

        def log(self, logs: dict, start_time=None) -> None:
            if "loss/policy_avg" in logs and "loss/value_avg" in logs and "loss" not in logs:
                logs["loss"] = logs["loss/policy_avg"] + self.args.vf_coef * logs["loss/value_avg"]
            super().log(logs, start_time)

    return RunnerPPOTrainer


def build(ctx):
    from transformers import AutoModelForSequenceClassification

    cfg = ctx.cfg
    section = cfg.section("ppo")
    reward_path, value_path = scorer_paths(cfg)  # fail fast on a missing reward model, before any loading
    path = builder.model_path(cfg)  # an SFT stage's LoRA output: merged, then a fresh adapter
    tokenizer, bundle, has_eval = common.load_inputs(ctx, DATA_KIND, path, padding_side="left")
    plan = ctx.plan  # fitted to the data by load_inputs
    if not isinstance(bundle.train[0]["prompt"], str):  # chat prompts (trl-lib/ultrafeedback-prompt): PPO samples text
        bundle.train = chat_prompts_as_text(bundle.train, tokenizer)
        bundle.eval = chat_prompts_as_text(bundle.eval, tokenizer) if has_eval else bundle.eval
    train = tokenize_prompts(bundle.train, tokenizer, cfg.data.max_length)
    evaluation = tokenize_prompts(bundle.eval, tokenizer, cfg.data.max_length) if has_eval else train.select(
        range(min(len(train), 8)))

    mini_batches = int(section.get("num_mini_batches", 1))
    rows = plan.micro_batch_size // mini_batches  # per backward (the planner pins accumulation 1 when mini_batches > 1)
    method = dict(
        response_length=generated_tokens(cfg),
        num_ppo_epochs=int(section.get("num_ppo_epochs", 4)),
        num_mini_batches=mini_batches,
        kl_coef=float(section.get("kl_coef", 0.05)),
        temperature=float(section.get("temperature", 0.7)),
        missing_eos_penalty=section.get("missing_eos_penalty", 1.0),
        stop_token="eos", num_sample_generations=0,
        local_rollout_forward_batch_size=int(section.get("local_rollout_forward_batch_size",
                                                         max(rows, PPO_ROLLOUT_CHUNK))),
        # PPOConfig declares world_size as a field (PPOTrainer overwrites it with the accelerator's count); left None,
        # TrainingArguments' DeepSpeed set-up multiplies by it before the trainer exists.
        world_size=ctx.env.world_size,
    )
    for key in ("kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "whiten_rewards"):
        if key in section:
            method[key] = section[key]
    kw = common.training_kwargs(ctx, **method)
    kw.pop("include_num_input_tokens_seen", None)  # PPO's own loop does not count tokens
    max_steps = kw.pop("max_steps", None)
    rollout_batch = plan.micro_batch_size * plan.gradient_accumulation_steps * ctx.env.world_size
    if max_steps and max_steps > 0:
        kw["total_episodes"] = max_steps * rollout_batch  # PPO counts episodes; one update = one rollout batch
    args = common.make_args(common.args_class(ARGS_CLASS), kw)
    args.max_steps = max_steps or -1

    peft_cfg = builder.peft_config(cfg)
    if peft_cfg is not None and cfg.peft.method not in ("lora", "dora"):
        raise UserError(f"peft.method: PPO trains LoRA/DoRA adapters or full models, not {cfg.peft.method}")
    policy = builder.load_model(cfg, plan, path)
    _sync_generation_config(policy, tokenizer)
    ref_model = None if peft_cfg is not None else builder.load_model(cfg, plan, path)  # LoRA: adapter disabled
    scorers = []
    # the value model trains whole: in one process an fp16 plan loads it in fp32, as the planner counts it (load_dtype)
    for field, p, trained in (("ppo.reward_model", reward_path, False), ("ppo.value_model", value_path, True)):
        with builder.loading(field, p):
            m = AutoModelForSequenceClassification.from_pretrained(
                p, num_labels=1, dtype=builder.torch_dtype(cfg, plan, trained_full=trained),
                pad_token_id=tokenizer.pad_token_id, trust_remote_code=cfg.model.trust_remote_code)
        m.config.pad_token_id = tokenizer.pad_token_id
        scorers.append(m)
    reward_model, value_model = scorers
    if plan.gradient_checkpointing:
        # PPOTrainer runs its own loop, which never applies args.gradient_checkpointing as HF's Trainer.train does
        # (and its PolicyAndValueWrapper would checkpoint the policy only): both trained models, as planned.
        for trained in (policy, value_model):
            trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = _ppo_trainer_class()(args=args, processing_class=tokenizer, model=policy, ref_model=ref_model,
                                   reward_model=reward_model, value_model=value_model, train_dataset=train,
                                   eval_dataset=evaluation, peft_config=peft_cfg)
    ctx.stats.update(reward_model=reward_path, value_model=value_path, rollout_batch=args.batch_size,
                     total_episodes=args.total_episodes)
    evaluator = None
    if has_eval:
        evaluator = ppo_evaluator(ctx, trainer, bundle.eval.to_list(), path, reward_path, tokenizer)
    return trainer, evaluator


def chat_prompts_as_text(dataset, tokenizer):
    """Chat prompts -> the text the tokenizer's chat template makes of them, ending in the assistant's generation
    prompt, as TRL's GRPO does; less the template's leading BOS where the tokenizer adds one itself (the prompts
    and the evaluator's generations tokenise text with special tokens), so it is not doubled."""
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]

    def as_text(row):
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        return {"prompt": text[len(bos):] if adds_bos and text.startswith(bos) else text}

    return dataset.map(as_text)


def tokenize_prompts(dataset, tokenizer, max_length: int):
    """Pre-tokenised `input_ids` only (PPOTrainer pads them on the left with its collator)."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the end of an over-long prompt: that is where the answer starts
    try:
        out = dataset.map(lambda row: {"input_ids": tokenizer(row["prompt"], truncation=True,
                                                              max_length=max_length)["input_ids"]},
                          remove_columns=dataset.column_names)
    finally:
        tokenizer.truncation_side = side
    return out


def _sync_generation_config(model, tokenizer) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id


def ppo_evaluator(ctx, trainer, rows: list[dict], path: str, reward_path: str, tokenizer):
    """Greedy answers to held-out prompts, scored by the reward model (a fresh copy), the task's exact match and
    `arith` reward (synthetic rows carry `answer`); `after` adds the training curve and final KL."""
    cfg, plan = ctx.cfg, ctx.plan
    cache: dict = {}

    def scorer(prompts, completions):
        if "model" not in cache:
            cache["model"] = rewards.load_scorer_model(reward_path, dtype=builder.torch_dtype(cfg, plan),
                                                       pad_token_id=tokenizer.pad_token_id,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        return rewards.score_texts(cache["model"], tokenizer, [p + c for p, c in zip(prompts, completions)])

    reward_fns = {"arith": rewards.REWARDS["arith"]} if rows and "answer" in rows[0] else {}
    base = rewards.reward_evaluator(ctx, rows, lambda when: builder.load_for_eval(cfg, plan, path, ctx.output_dir,
                                                                                  when), reward_fns, scorer)
    if base is None:
        return None

    def evaluate(when: str) -> dict:
        out = base(when)
        if when == "after":
            history = [h for h in trainer.state.log_history if "objective/scores" in h]
            if history:
                out["curve"] = [{"step": h.get("step"), "score": h["objective/scores"], "kl": h.get("objective/kl"),
                                 "rlhf_reward": h.get("objective/rlhf_reward")} for h in history]
                k = max(1, len(history) // 4)
                out["train_score_first"] = sum(h["objective/scores"] for h in history[:k]) / k
                out["train_score_last"] = sum(h["objective/scores"] for h in history[-k:]) / k
                out["kl"] = history[-1].get("objective/kl")
        cache.pop("model", None)
        return out

    return evaluate
