"""Sequence classification with the HF Trainer (the classic BERT sentiment recipe), for any
AutoModelForSequenceClassification: accuracy and macro-F1 on the eval split, early stopping on the eval metric with
the best checkpoint restored at the end, optional class weights and layer freezing, full fine-tuning or LoRA/DoRA.

    classify:
      metric: f1                  # accuracy | f1 (macro-F1): picks the best checkpoint and drives early stopping
      early_stopping_patience: 3  # evaluations without improvement before stopping (0: off)
      eval_steps: 20              # evaluate (and checkpoint) every N steps
      class_weights: none         # none | auto (inverse label frequency) | [w0, w1, ...]
      freeze_layers: 0            # freeze the embeddings and the first N transformer layers
"""
from __future__ import annotations

from launcher.errors import UserError
from recipes import builder, common

DATA_KIND = "classification"
ARGS_CLASS = "transformers:TrainingArguments"  # its TrainingArguments class (checked before a run starts)


def build(ctx):
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, EarlyStoppingCallback,
                              Trainer)


    cfg = ctx.cfg
    section = cfg.section("classify")
    metric = section.get("metric", "f1")  # the section's values were checked when the recipe loaded (config_checks)
    path = builder.model_path(cfg)
    tokenizer, bundle, has_eval = common.load_inputs(ctx, DATA_KIND, path)
    plan = ctx.plan  # fitted to the data by load_inputs
    labels = sorted(set(bundle.train["label"]) | (set(bundle.eval["label"]) if has_eval else set()))
    names = bundle.stats.get("label_names")
    needed = len(names) if names else max(labels) + 1
    num_labels = int(section.get("num_labels") or needed)
    if num_labels < 2:
        raise UserError(f"data: classification needs at least 2 labels, found {labels}")
    if num_labels < needed:  # the head would have no output for the highest labels (an index error mid-training)
        raise UserError(f"classify.num_labels: {num_labels}, but the data has {needed} labels (the last: "
                        f"{names[-1] if names else max(labels)}); set classify.num_labels={needed} or remove it")
    weights = class_weights(section.get("class_weights", "none"), bundle.stats.get("label_counts") or {}, num_labels)
    if weights is not None:
        ctx.stats["class_weights"] = ", ".join(f"{w:.3g}" for w in weights)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=cfg.data.max_length)

    keep = {"input_ids", "attention_mask", "token_type_ids", "label"}
    train = bundle.train.map(tokenize, batched=True)
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    evaluation = None
    if has_eval:
        evaluation = bundle.eval.map(tokenize, batched=True)
        evaluation = evaluation.remove_columns([c for c in evaluation.column_names if c not in keep])

    eval_steps = int(section.get("eval_steps", 20))
    patience = int(section.get("early_stopping_patience", 3))
    best_metric = {"f1": "eval_f1_macro", "accuracy": "eval_accuracy"}[metric]
    method_defaults = dict(eval_strategy="steps" if has_eval else "no", eval_steps=eval_steps,
                           save_steps=eval_steps if has_eval else 100, load_best_model_at_end=has_eval,
                           metric_for_best_model=best_metric if has_eval else None,
                           greater_is_better=True, learning_rate=5e-5)
    kw = common.training_kwargs(ctx, **method_defaults)
    args = common.make_args(common.args_class(ARGS_CLASS), kw)
    if args.load_best_model_at_end and args.save_steps % args.eval_steps:
        raise UserError(f"training.save_steps: with early stopping, checkpoints must land on evaluations; make it a "
                        f"multiple of classify.eval_steps ({args.eval_steps})")

    id2label = {i: (names[i] if names and i < len(names) else str(i)) for i in range(num_labels)}
    model = builder.load_model(cfg, plan, path, auto_class=AutoModelForSequenceClassification, num_labels=num_labels,
                               id2label=id2label, label2id={v: k for k, v in id2label.items()},
                               pad_token_id=tokenizer.pad_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_cfg = builder.peft_config(cfg, "SEQ_CLS")
    if peft_cfg is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_cfg)
    frozen = freeze_layers(model, int(section.get("freeze_layers", 0) or 0))
    if frozen:
        ctx.stats["frozen_layers"] = frozen

    callbacks = []
    if has_eval and patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience,
                                               early_stopping_threshold=float(section.get("early_stopping_threshold",
                                                                                          0.0))))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics, callbacks=callbacks,
                      compute_loss_func=weighted_loss(weights) if weights is not None else None)
    evaluator = None
    if has_eval:
        evaluator = classification_evaluator(ctx, bundle.eval.to_list(), path, tokenizer, num_labels)
    return trainer, evaluator


def class_weights(spec, counts: dict, num_labels: int):
    """`none` -> None; `auto` -> n / (k * count_c) (balanced); a list -> as given (one per label)."""
    if spec in (None, "none", False):
        return None
    if spec == "auto":
        total = sum(counts.values())
        if not total:
            return None
        present = [int(counts.get(i, counts.get(str(i), 0))) for i in range(num_labels)]
        return [total / (num_labels * c) if c else 0.0 for c in present]
    if isinstance(spec, list) and len(spec) == num_labels and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in spec):
        return [float(w) for w in spec]
    raise UserError(f"classify.class_weights: expected none, auto or a list of {num_labels} non-negative numbers, "
                    f"got {spec!r}")


def weighted_loss(weights):
    """`Trainer(compute_loss_func=...)`: class-weighted cross-entropy, summed and divided by the number of labelled
    items in the (accumulated) batch, the normalisation Trainer expects from a compute_loss_func."""
    import torch

    weight = torch.tensor(weights, dtype=torch.float32)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        w = weight.to(device=logits.device, dtype=torch.float32)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                                 weight=w, reduction="sum")
        if num_items_in_batch is not None:
            return loss / num_items_in_batch
        return loss / labels.numel()

    return loss_fn


def _layer_list(model):
    """The transformer's block list, found by shape rather than by name (BERT encoder.layer, Llama layers, ...)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            if best is None or len(name) < len(best[0]):
                best = (name, module)
    return best[1] if best else None


def freeze_layers(model, n: int) -> int:
    """Freeze the input embeddings and the first `n` transformer layers; returns how many layers were frozen."""
    if n <= 0:
        return 0
    layers = _layer_list(model)
    if layers is None:
        raise UserError("classify.freeze_layers: could not find this model's transformer layers; set it to 0")
    if n > len(layers):
        raise UserError(f"classify.freeze_layers: {n} is more than the model's {len(layers)} layers")
    for p in model.get_input_embeddings().parameters():
        p.requires_grad = False
    for layer in list(layers)[:n]:
        for p in layer.parameters():
            p.requires_grad = False
    return n


def compute_metrics(eval_pred) -> dict:
    import numpy as np

    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    return {"accuracy": float((preds == labels).mean()), "f1_macro": macro_f1(preds, labels)}


def macro_f1(preds, labels) -> float:
    import numpy as np

    scores = []
    for c in np.unique(np.concatenate([labels, preds])):
        tp = float(((preds == c) & (labels == c)).sum())
        fp = float(((preds == c) & (labels != c)).sum())
        fn = float(((preds != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def classification_evaluator(ctx, rows, base_path: str, tokenizer, num_labels: int):
    """Accuracy / macro-F1 of freshly loaded models on the eval split (rank 0 only, so no trainer collectives):
    before = the starting model with its new head, after = the saved output (the restored best checkpoint)."""
    cfg, plan = ctx.cfg, ctx.plan
    rows = rows[: cfg.eval.num_examples]
    if not rows:
        return None

    def evaluate(when: str) -> dict:
        import numpy as np
        import torch

        from recipes import rewards

        model = rewards.load_scorer_model(base_path if when == "before" else str(ctx.output_dir),
                                          dtype=builder.torch_dtype(cfg, plan), pad_token_id=tokenizer.pad_token_id,
                                          num_labels=num_labels, seed=cfg.seed if when == "before" else None,
                                          trust_remote_code=cfg.model.trust_remote_code)
        preds = []
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            for i in range(0, len(rows), 32):
                batch = tokenizer([r["text"] for r in rows[i:i + 32]], truncation=True,
                                  max_length=cfg.data.max_length, padding=True, return_tensors="pt")
                with torch.no_grad():
                    preds += model(**batch).logits.argmax(-1).tolist()
        finally:
            tokenizer.padding_side = side
        labels = np.array([int(r["label"]) for r in rows])
        preds = np.array(preds)
        samples = [{"prompt": r["text"], "expected": str(r["label"]), "generated": str(p)}
                   for r, p in zip(rows[: cfg.eval.samples], preds)]
        return {"accuracy": float((preds == labels).mean()), "f1_macro": macro_f1(preds, labels), "n": len(rows),
                "samples": samples}

    return evaluate
