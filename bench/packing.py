"""Padding with and without SFT packing on skewed-length data, and tiny-model SFT throughput each way.

    .venv/bin/python bench/packing.py [--rows 600] [--max-length 256] [--batch-size 8] [--steps 8]

Prints, for TRL 1.12's SFTTrainer (packing=False vs packing=True, packing_strategy='bfd', which turns on
padding-free batches):
  * the padding fraction predicted by recipes.data.padding_fraction (packed bins padded per batch, and padding-free)
  * the padding fraction measured on the trainer's own dataloader batches
  * real (non-pad) tokens per second over a few optimizer steps of the tiny Llama
  * whether packed rows attend across example boundaries (logits of a packed row vs each example alone)
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the model learns from data and each batch moves the weights a little toward a lower loss while the "
         "optimizer keeps its moments for every parameter so memory grows with the size of the network").split()


def skewed_texts(n: int, seed: int) -> list[str]:
    """80 % short rows (4-16 words), 20 % long rows (60-200 words): the shape of real instruction data, where a
    few long answers set every padded batch's width."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(4, 16) if rng.random() < 0.8 else rng.randint(60, 200)
        rows.append(" ".join(rng.choice(WORDS) for _ in range(k)) + ".")
    return rows


def make_trainer(tokenizer, texts, packed: bool, max_length: int, batch_size: int, out_dir: str):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from recipes.tiny import tiny_model

    args = SFTConfig(
        output_dir=out_dir, max_length=max_length, packing=packed, packing_strategy="bfd",
        per_device_train_batch_size=batch_size, learning_rate=1e-3, max_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True, dataset_num_proc=None,
        shuffle_dataset=False,
    )
    model = tiny_model(tokenizer, seed=0, attn_implementation="sdpa")
    data = datasets.Dataset.from_dict({"text": texts})
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def measure(trainer, pad_id: int, steps: int, warmup: int = 2) -> dict:
    """Padding from the trainer's own batches, and real tokens/s of forward+backward+AdamW steps."""
    import torch

    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = list(itertools.islice(trainer.get_train_dataloader(), warmup + steps))
    slots = sum(b["input_ids"].numel() for b in batches)
    pads = sum(int((b["input_ids"] == pad_id).sum()) for b in batches)
    real, elapsed = 0, 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
        loss = model(**inputs, use_cache=False).loss  # as TRL's compute_loss: keeps packed rows isolated
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:  # the first steps pay for allocator warm-up and lazy init
            elapsed += time.perf_counter() - start
            real += int((batch["input_ids"] != pad_id).sum())
    return {"padding": pads / slots, "tokens_per_s": real / elapsed, "rows_per_batch": batches[-1]["input_ids"].shape,
            "batches": len(batches) - warmup}


def cross_attention_check(tokenizer, implementation: str, use_cache) -> float:
    """Max |logit difference| between two examples run alone and the same two packed into one padding-free row
    (position_ids restart at 0, no attention mask). ~0 means no attention across the example boundary.

    transformers 5 builds the block-diagonal mask from position_ids for sdpa/eager too, but only when no KV cache
    is in play: a forward with the config's default use_cache=True creates one and skips the detection. The HF
    Trainer sets config.use_cache = args.use_cache (False) and TRL's compute_loss passes use_cache=False, so
    training is isolated; a hand-written loop over packed batches must pass use_cache=False itself."""
    import torch

    from recipes.tiny import tiny_model

    model = tiny_model(tokenizer, seed=1, attn_implementation=implementation).eval()
    first, second = tokenizer("12+7=19")["input_ids"], tokenizer("the model learns from data")["input_ids"]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids]), use_cache=use_cache).logits[0] for ids in (first, second)]
        packed = model(input_ids=torch.tensor([first + second]), use_cache=use_cache,
                       position_ids=torch.tensor([list(range(len(first))) + list(range(len(second)))])).logits[0]
    return float((packed - torch.cat(alone)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    opts = parser.parse_args()

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    torch.manual_seed(opts.seed)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    from recipes.data import padding_fraction
    from recipes.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = skewed_texts(opts.rows, opts.seed)
    lengths = [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]  # +1: the eos TRL appends
    print(f"data: {len(texts)} rows, tokens per row min {min(lengths)} / mean {sum(lengths) / len(lengths):.0f} / "
          f"max {max(lengths)}; max_length {opts.max_length}, batch size {opts.batch_size}")
    print("predicted padding (recipes.data.padding_fraction):")
    for label, packed, free in (("unpacked, padded per batch", False, False),
                                ("packed (BFD), bins padded", True, False),
                                ("packed (BFD), padding-free (TRL)", True, True)):
        share = padding_fraction(lengths, opts.batch_size, packed, opts.max_length, padding_free=free)
        print(f"  {label:33s} {share:6.1%}")

    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for packed in (False, True):
            trainer = make_trainer(tokenizer, texts, packed, opts.max_length, opts.batch_size, out_dir)
            results[packed] = measure(trainer, tokenizer.pad_token_id, opts.steps)
    print(f"measured on SFTTrainer batches ({opts.steps} tiny-model steps each, torch threads "
          f"{torch.get_num_threads()}):")
    for packed, r in results.items():
        label = "packed (bfd, padding-free)" if packed else "unpacked"
        print(f"  {label:27s} padding {r['padding']:6.1%}   {r['tokens_per_s']:9.0f} real tokens/s   "
              f"batch tensor {tuple(r['rows_per_batch'])}")
    speedup = results[True]["tokens_per_s"] / results[False]["tokens_per_s"]
    print(f"  packed/unpacked throughput: x{speedup:.2f}")
    for implementation in ("sdpa", "eager"):
        for use_cache, when in ((False, "use_cache=False, as the trainers run"), (None, "config default use_cache")):
            diff = cross_attention_check(tokenizer, implementation, use_cache)
            verdict = "isolated" if diff < 1e-4 else "EXAMPLES ATTEND ACROSS THE BOUNDARY"
            print(f"packed-row isolation, {implementation}, {when}: max |logit diff| {diff:.1e} -> {verdict}")


if __name__ == "__main__":
    main()
