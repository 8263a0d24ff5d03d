"""SFT with TRL's SFTTrainer: full fine-tuning, or adapters (LoRA, DoRA, prompt tuning, prefix tuning) via peft.

Data: prompt/completion (loss on the completion only, TRL's default), chat messages (loss on the assistant turns where
the chat template marks them for TRL's assistant_only_loss, else on every turn, said at the start), or plain text.
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
    method_defaults = dict(max_length=cfg.data.max_length, packing=cfg.data.packing)
    if "messages" in bundle.train.column_names and "assistant_only_loss" not in cfg.training:
        method_defaults.update(assistant_turns_only(ctx, tokenizer))
    args = common.make_args(common.args_class(ARGS_CLASS), common.training_kwargs(ctx, **method_defaults))
    model = builder.load_model(cfg, plan, path)
    trainer = SFTTrainer(model=model, args=args, train_dataset=bundle.train,
                         eval_dataset=bundle.eval if has_eval else None, processing_class=tokenizer,
                         peft_config=builder.peft_config(cfg))
    evaluator = None
    if has_eval and "prompt" in bundle.eval.column_names and isinstance(bundle.eval[0]["prompt"], str):
        evaluator = common.exact_match_evaluator(
            ctx, bundle.eval.to_list(), lambda when: builder.load_for_eval(cfg, plan, path, ctx.output_dir, when))
    return trainer, evaluator


def assistant_turns_only(ctx, tokenizer) -> dict:
    """Chat rows train on the assistant's turns, as torchtune's and axolotl's chat datasets do by default, where the
    template marks them ({% generation %}) for TRL. TRL can patch a few known templates itself, and refuses others
    only once the model is loaded, so an unmarked template trains on every turn and the start says so."""
    from trl.chat_template_utils import has_generation_markers

    if has_generation_markers(tokenizer.chat_template or ""):
        return {"assistant_only_loss": True}
    ctx.start_notes.append("chat data: the loss covers every turn (system and user too), as the chat template marks "
                           "no assistant turns; training.assistant_only_loss=true asks TRL to patch a template it "
                           "knows (Llama 3, Qwen, Gemma, Phi-3, ...)")
    return {}
