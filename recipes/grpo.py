"""GRPO: TRL's GRPOTrainer on a prompts-only dataset, rewarded by Python functions chosen by name from
`recipes/rewards.py` (`grpo.reward: arith`) and/or trained reward models (`grpo.reward: runs/rm_tiny`). Nothing from
the config is ever evaluated as code. Full fine-tuning or adapters (LoRA/DoRA via peft).

    grpo:
      reward: arith            # a name, a reward-model directory, or a list of them
      reward_weights: [1.0]    # optional, one per reward
      num_generations: 4       # completions per prompt; the global batch must be a multiple of it
      max_completion_length: 8
      beta: 0.0                # KL coefficient (0: no reference model is loaded)
      temperature: 1.0

Reports the mean reward of greedy answers on held-out prompts, and exact-match accuracy on synthetic tasks.
"""
from __future__ import annotations

from launcher.errors import UserError
from launcher.recipe_request import generated_tokens, grpo_beta
from recipes import builder, common, rewards

DATA_KIND = "prompts"
ARGS_CLASS = "trl:GRPOConfig"  # its TrainingArguments class (checked before a run starts)


def build(ctx):
    from trl import GRPOTrainer

    cfg = ctx.cfg
    section = cfg.section("grpo")
    names = section.get("reward", "arith")  # its values were checked when the recipe loaded (config_checks)
    names = names if isinstance(names, list) else [names]
    path = builder.model_path(cfg)
    tokenizer, bundle, has_eval = common.load_inputs(ctx, DATA_KIND, path, padding_side="left")
    plan = ctx.plan  # fitted to the data by load_inputs
    if bundle.stats.get("truncated"):
        bundle.train = cut_prompts(bundle.train, tokenizer, cfg.data.max_length)
    reward_fns = {n: rewards.resolve(n, tokenizer, "grpo.reward", builder.torch_dtype(cfg, plan),
                                     cfg.model.trust_remote_code) for n in names}

    num_generations = int(section.get("num_generations", 4))
    global_batch = plan.micro_batch_size * plan.gradient_accumulation_steps * ctx.env.world_size
    if global_batch % num_generations:
        raise UserError(f"grpo.num_generations: {num_generations} must divide the global batch "
                        f"({global_batch} = micro-batch {plan.micro_batch_size} x accumulation "
                        f"{plan.gradient_accumulation_steps} x {ctx.env.world_size} rank(s)); "
                        f"change grpo.num_generations or plan.global_batch_size")
    method_defaults = dict(
        num_generations=num_generations,
        max_completion_length=generated_tokens(cfg),
        beta=grpo_beta(cfg),
        temperature=float(section.get("temperature", 1.0)),
        log_completions=False,
        # GRPO's batches are prompts, not input_ids: the Trainer's token count only warns, once per step
        include_num_input_tokens_seen=False,
    )
    for key in ("loss_type", "scale_rewards", "reward_weights"):
        if key in section:
            method_defaults[key] = section[key]
    args = common.make_args(common.args_class(ARGS_CLASS), common.training_kwargs(ctx, **method_defaults))
    model = builder.load_model(cfg, plan, path)
    trainer = GRPOTrainer(model=model, reward_funcs=list(reward_fns.values()), args=args,
                          train_dataset=bundle.train, processing_class=tokenizer,
                          peft_config=builder.peft_config(cfg))
    evaluator = None
    if has_eval:
        evaluator = rewards.reward_evaluator(
            ctx, bundle.eval.to_list(), lambda when: builder.load_for_eval(cfg, plan, path, ctx.output_dir, when),
            {n.rstrip("/").split("/")[-1]: fn for n, fn in reward_fns.items()})
    return trainer, evaluator


def cut_prompts(dataset, tokenizer, max_length: int):
    """TRL 1.12's GRPOTrainer tokenises prompts whole (it has no max_prompt_length); the plan sized them at
    data.max_length. Keep the last max_length tokens of longer text prompts (the end is where the answer starts, as
    PPO's tokenize_prompts keeps); conversational prompts cannot be cut that way and are refused."""

    def cut(row):
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_length:
                return {"prompt": prompt}
            raise UserError(f"data.max_length: a conversational GRPO prompt is longer than {max_length} tokens; raise "
                            f"data.max_length or set data.too_long=drop")
        ids = tokenizer(prompt)["input_ids"]
        while len(ids) > max_length:  # cut at a token boundary; a re-tokenised cut may merge differently: repeat
            offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            prompt = prompt[offsets[min(len(offsets) - 1, len(ids) - max_length)][0]:]
            ids = tokenizer(prompt)["input_ids"]
        return {"prompt": prompt}

    return dataset.map(cut, desc="Cutting over-long prompts")
