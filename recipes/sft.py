"""SFT with TRL's SFTTrainer: full fine-tuning, or adapters (LoRA, DoRA, prompt tuning, prefix tuning) via peft.

Data: prompt/completion (loss on the completion only), chat messages (loss on assistant turns), or plain text.
"""
from __future__ import annotations

from recipes import builder, common

DATA_KIND = "sft"
ARGS_CLASS = "trl:SFTConfig"  # its TrainingArguments class (checked before a run starts)


def build(ctx):
    from trl import SFTTrainer

    cfg = ctx.cfg
    path = builder.model_path(cfg)
    tokenizer, bundle, has_eval = common.load_inputs(ctx, DATA_KIND, path)
    plan = ctx.plan  # fitted to the data by load_inputs
    args = common.make_args(common.args_class(ARGS_CLASS), common.training_kwargs(
        ctx, max_length=cfg.data.max_length, packing=cfg.data.packing))
    model = builder.load_model(cfg, plan, path)
    trainer = SFTTrainer(model=model, args=args, train_dataset=bundle.train,
                         eval_dataset=bundle.eval if has_eval else None, processing_class=tokenizer,
                         peft_config=builder.peft_config(cfg))
    evaluator = None
    if has_eval and "prompt" in bundle.eval.column_names and isinstance(bundle.eval[0]["prompt"], str):
        evaluator = common.exact_match_evaluator(
            ctx, bundle.eval.to_list(), lambda when: builder.load_for_eval(cfg, plan, path, ctx.output_dir, when))
    return trainer, evaluator
