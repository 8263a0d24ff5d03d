"""Reward model: TRL's RewardTrainer (Bradley-Terry loss) on preference pairs, a sequence-classification head with one
output. Full fine-tuning or adapters (LoRA/DoRA, task type SEQ_CLS: the score head is trained and saved with them).

Reports pairwise accuracy on held-out pairs (score(chosen) > score(rejected)) before and after training, measured on
freshly loaded models. The output directory is what `ppo.reward_model` / `grpo.reward` point at.
"""
from __future__ import annotations

from recipes import builder, common, rewards

DATA_KIND = "preference"
ARGS_CLASS = "trl:RewardConfig"  # its TrainingArguments class (checked before a run starts)


def build(ctx):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer

    cfg = ctx.cfg
    section = cfg.section("rm")
    path = builder.model_path(cfg)
    # TRL's RewardTrainer drops a pair longer than max_length (it cannot truncate one): drop it here, where the
    # summary counts it, rather than report it truncated
    tokenizer, bundle, has_eval = common.load_inputs(ctx, DATA_KIND, path, too_long="drop")
    if cfg.data.too_long == "truncate" and bundle.stats["dropped"].get("too_long"):
        ctx.start_notes.append(f"{bundle.stats['dropped']['too_long']} pair(s) longer than data.max_length "
                               f"{cfg.data.max_length} dropped: the reward trainer cannot truncate a pair")
    plan = ctx.plan  # fitted to the data by load_inputs
    method_defaults = dict(max_length=cfg.data.max_length)
    if section.get("center_rewards_coefficient") is not None:
        method_defaults["center_rewards_coefficient"] = float(section["center_rewards_coefficient"])
    args = common.make_args(common.args_class(ARGS_CLASS), common.training_kwargs(ctx, **method_defaults))
    model = builder.load_model(cfg, plan, path, auto_class=AutoModelForSequenceClassification, num_labels=1,
                               pad_token_id=tokenizer.pad_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=args, train_dataset=bundle.train,
                            eval_dataset=bundle.eval if has_eval else None, processing_class=tokenizer,
                            peft_config=builder.peft_config(cfg, "SEQ_CLS"))
    if cfg.quant.load_in_4bit and plan.precision == "fp32":
        # TRL casts a 4-bit model's trainable parameters to bf16 (the QLoRA paper's adapters), the score head's
        # trained copy too; LoRA layers cast their input, a plain Linear head does not, and without autocast (an
        # fp32 plan: CPUs) the fp32 hidden states then meet a bf16 head and the forward fails
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and "modules_to_save" in name:
                param.data = param.data.float()
    evaluator = pairwise_evaluator(ctx, bundle.eval.to_list() if has_eval else [], path, tokenizer) \
        if has_eval else None
    return trainer, evaluator


def pairwise_evaluator(ctx, rows: list[dict], base_path: str, tokenizer):
    """Held-out pairwise accuracy of the reward model: before (base + fresh head, seeded) and after (saved output)."""
    cfg, plan = ctx.cfg, ctx.plan
    rows = [r for r in rows if isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str)]
    rows = rows[: cfg.eval.num_examples]
    if not rows:
        return None
    for r in rows:
        r.setdefault("prompt", "")

    def evaluate(when: str) -> dict:
        # before: the base with a fresh head, seeded, so "before" is chance level, repeatably
        model = rewards.load_scorer_model(base_path if when == "before" else str(ctx.output_dir),
                                          dtype=builder.torch_dtype(cfg, plan), pad_token_id=tokenizer.pad_token_id,
                                          seed=cfg.seed if when == "before" else None,
                                          trust_remote_code=cfg.model.trust_remote_code)
        result = rewards.pairwise_accuracy(model, tokenizer, rows)
        del model
        return result

    return evaluate
