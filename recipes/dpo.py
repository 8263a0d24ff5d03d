"""DPO: TRL's DPOTrainer on preference pairs (prompt/chosen/rejected). Full fine-tuning (TRL loads a frozen reference
copy of the starting model) or adapters (LoRA/DoRA: `ref_model=None`, the reference is the policy with its adapter
disabled, so no second copy is held).

Reports exact match of greedy answers on held-out prompts (the chosen answer is the expected one) before and after,
plus DPO's own held-out preference accuracy (`eval_rewards/accuracies`) when there is an eval split.
"""
from __future__ import annotations

from recipes import builder, common

DATA_KIND = "preference"
ARGS_CLASS = "trl:DPOConfig"  # its TrainingArguments class (checked before a run starts)


def build(ctx):
    from trl import DPOTrainer

    cfg = ctx.cfg
    section = cfg.section("dpo")
    path = builder.model_path(cfg)
    tokenizer, bundle, has_eval = common.load_inputs(ctx, DATA_KIND, path)
    plan = ctx.plan  # fitted to the data by load_inputs
    method_defaults = dict(max_length=cfg.data.max_length, beta=float(section.get("beta", 0.1)))
    if section.get("loss_type"):
        loss = section["loss_type"]
        method_defaults["loss_type"] = loss if isinstance(loss, list) else [loss]
    args = common.make_args(common.args_class(ARGS_CLASS), common.training_kwargs(ctx, **method_defaults))
    model = builder.load_model(cfg, plan, path)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=bundle.train,
                         eval_dataset=bundle.eval if has_eval else None, processing_class=tokenizer,
                         peft_config=builder.peft_config(cfg))
    evaluator = None
    if has_eval and isinstance(bundle.eval[0].get("prompt"), str) and isinstance(bundle.eval[0]["chosen"], str):
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in bundle.eval.to_list()]
        evaluator = common.exact_match_evaluator(
            ctx, rows, lambda when: builder.load_for_eval(cfg, plan, path, ctx.output_dir, when))
    return trainer, evaluator
