"""Training data: load (synthetic, local files, hub), detect the format, convert to what TRL 1.12 trainers expect,
validate every row before training, count/drop over-long rows, split train/eval, mix sources.

    bundle = load_data(cfg.data, "sft", tokenizer, seed=cfg.seed)   # -> DataBundle(train, eval, format, stats)

Reading each source: recipes/data_sources.py. Formats and the conversion of each row: recipes/formats.py.
Output columns per kind:
    sft             prompt/completion (strings or conversational lists), messages (chat), or text
    preference      prompt/chosen/rejected (prompt may be absent: TRL then extracts the shared prefix)
    prompts         prompt (+ answer when the data has one: reward functions score against it)
    classification  text/label (int; string labels map to sorted names, listed in stats["label_names"])
Every bad input raises UserError with one line naming the file, row and field, and the fix.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

from launcher.errors import UserError
from recipes.data_sources import RawSource, read_source
from recipes.formats import FORMATS, convert, detect_format, label_mapping, require_columns

KINDS = ("sft", "preference", "prompts", "classification")
LENGTH_COLUMN = "_n_tokens"  # each row's token count, added by count_tokens


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset or None (eval_ratio 0 and no eval_source)
    format: str  # detected format of the (first) training source, e.g. "alpaca", "synthetic:arith"
    stats: dict = field(default_factory=dict)  # for the run summary: rows read, dropped (with reasons), truncated, ...
    train_lengths: Optional[list] = None  # tokens of each training row, in the dataset's order (None: not counted)


def load_data(data_cfg, kind: str, tokenizer=None, seed: int = 0, too_long: str | None = None) -> DataBundle:
    """`too_long`: overrides data.too_long for a trainer that cannot truncate (rm)."""
    if kind not in KINDS:
        raise UserError(f"unknown data kind '{kind}'; expected one of {', '.join(KINDS)}")
    fmt_name = getattr(data_cfg, "format", "auto") or "auto"
    if fmt_name != "auto" and fmt_name not in FORMATS:
        raise UserError(f"data.format: unknown format '{fmt_name}'; use auto or one of {', '.join(FORMATS)}")
    sources = data_cfg.source if isinstance(data_cfg.source, (list, tuple)) else [data_cfg.source]
    if not sources or not all(isinstance(s, str) and s.strip() for s in sources):
        raise UserError("data.source: give a file, directory, synthetic:TASK or hub dataset name (or a list)")
    weights = _check_weights(getattr(data_cfg, "weights", None), len(sources))
    eval_source = getattr(data_cfg, "eval_source", None)
    eval_ratio = float(getattr(data_cfg, "eval_ratio", 0.1) or 0.0)
    max_length = getattr(data_cfg, "max_length", None)
    too_long = too_long or getattr(data_cfg, "too_long", "truncate")
    if too_long not in ("truncate", "drop"):
        raise UserError(f"data.too_long: '{too_long}' is not one of truncate, drop")

    # Phase 1: read every source raw, so string class labels can get one mapping across all of them.
    raws = [read_source(s, data_cfg, kind, seed + i, for_eval=False) for i, s in enumerate(sources)]
    eval_raw = read_source(eval_source, data_cfg, kind, seed + 7919, for_eval=True) if eval_source else None
    label_map = label_mapping([r for r in raws + [eval_raw] if r is not None]) \
        if kind == "classification" else None

    stats: dict = {"kind": kind, "sources": [], "rows_read": 0, "dropped": {}, "truncated": 0,
                   "max_length": max_length, "too_long": too_long}
    if label_map:
        stats["label_names"] = [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]
    trains, evals = [], []
    for raw in raws:
        train, held_out = _prepare(raw, kind, fmt_name, label_map, tokenizer, max_length, too_long, stats)
        if held_out is None and not eval_source and eval_ratio > 0:
            train, held_out = split_train_eval(train, eval_ratio, seed, stratify=kind == "classification")
        trains.append(train)
        if held_out is not None and not eval_source:
            evals.append(held_out)
    if eval_raw is not None:
        evals = [d for d in _prepare(eval_raw, kind, fmt_name, label_map, tokenizer, max_length, too_long,
                                     stats, role="eval")[:1]]

    _check_same_columns([t for t in trains], sources)
    train = mix(trains, weights, seed) if len(trains) > 1 else trains[0]
    evaluation = _concat(evals) if evals else None
    # The counted lengths travelled with the rows through dropping, splitting and mixing; the trainers get none.
    train, train_lengths = _pop_lengths(train)
    evaluation, _ = _pop_lengths(evaluation)
    stats.update(train_rows=len(train), eval_rows=len(evaluation) if evaluation is not None else 0,
                 columns=list(train.column_names), format=stats["sources"][0]["format"])
    if kind == "classification":
        stats["label_counts"] = _label_counts(train)
    return DataBundle(train=train, eval=evaluation, format=stats["format"], stats=stats, train_lengths=train_lengths)


def count_tokens(batch, tokenizer, kind):
    """Tokens each row occupies in training (chat rows through the chat template; +1 for the eos TRL appends).
    Each batch goes to the fast tokenizer in one call per kind of text: row-by-row calls cost more than the
    training steps of a short run."""
    n = len(next(iter(batch.values())))
    eos = 0 if kind in ("prompts", "classification") else 1
    plain, chat = [], []  # (row, text): plain text gets special tokens + eos, rendered chat already has its own

    def add(row, value, generation_prompt=False):
        if isinstance(value, list):
            chat.append((row, tokenizer.apply_chat_template(value, tokenize=False,
                                                             add_generation_prompt=generation_prompt)))
        else:
            plain.append((row, value))

    def joined(prompt, completion):
        return prompt + completion if isinstance(prompt, type(completion)) else completion

    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        if "messages" in row:
            add(i, row["messages"])
        elif "chosen" in row:  # the longer of the two sides counts
            prompt = row.get("prompt") or ("" if isinstance(row["chosen"], str) else [])
            add(i, joined(prompt, row["chosen"]))
            add(i, joined(prompt, row["rejected"]))
        elif "completion" in row:
            add(i, joined(row["prompt"], row["completion"]))
        elif "prompt" in row:
            add(i, row["prompt"], generation_prompt=True)
        else:
            add(i, row["text"])
    lengths = [0] * n
    for items, special, extra in ((plain, True, eos), (chat, False, 0)):
        if items:
            ids = tokenizer([text for _, text in items], add_special_tokens=special)["input_ids"]
            for (i, _), row_ids in zip(items, ids):
                lengths[i] = max(lengths[i], len(row_ids) + extra)
    return {LENGTH_COLUMN: lengths}


# ---- preparing: convert, validate, length, split ---------------------------------------------------------------

def _prepare(raw: RawSource, kind, fmt_name, label_map, tokenizer, max_length, too_long, stats, role="train"):
    import datasets

    if raw.synthetic is not None:
        train_rows, held_rows = raw.synthetic
        fmt = f"synthetic:{raw.task}"
        pieces = [("", datasets.Dataset.from_list(train_rows))] if train_rows else []
        held = datasets.Dataset.from_list(held_rows) if held_rows else None
        rows_read = len(train_rows) + len(held_rows or [])
    else:
        pieces, fmt, rows_read, held = [], None, 0, None
        for label, ds in raw.parts:
            detected = detect_format(ds.column_names, label) if fmt_name == "auto" else fmt_name
            require_columns(detected, ds.column_names, label)
            pieces.append((label, convert(ds, detected, kind, label, label_map)))
            fmt = fmt or detected
            rows_read += len(ds)
    if not pieces and held is None:
        raise UserError(f"{raw.name}: no rows to train on; check data.source and data.num_examples")
    entry = {"source": raw.name, "role": role, "format": fmt, "rows_read": rows_read}
    stats["sources"].append(entry)
    stats["rows_read"] += rows_read
    out = []
    for label, ds in pieces:
        ds = _handle_length(ds, kind, label or raw.name, tokenizer, max_length, too_long, stats)
        out.append(ds)
    if len(out) > 1:  # the files of one directory: concatenated, so they must agree as separate sources do
        _check_same_columns(out, [label for label, _ in pieces])
    train = _concat(out) if out else None
    if held is not None:
        held = _handle_length(held, kind, raw.name, tokenizer, max_length, too_long, stats)
    if train is None or len(train) == 0:
        raise UserError(f"{raw.name}: no rows left after dropping over-long ones (max_length={max_length}); "
                        f"raise data.max_length or set data.too_long=truncate")
    return train, held


def _handle_length(ds, kind, label, tokenizer, max_length, too_long, stats):
    if tokenizer is None or not max_length:
        return ds
    ds = ds.map(count_tokens, batched=True, fn_kwargs={"tokenizer": tokenizer, "kind": kind},
                desc="Counting tokens")
    lengths = list(ds[LENGTH_COLUMN])
    over = sum(1 for n in lengths if n > max_length)
    stats["max_tokens"] = max([stats.get("max_tokens", 0)] + lengths)
    # the longest row as trained: over-long rows are dropped, or cut at max_length
    kept = [n for n in lengths if n <= max_length] if too_long == "drop" else [min(n, max_length) for n in lengths]
    stats["longest"] = max([stats.get("longest", 0)] + kept)
    stats["total_tokens"] = stats.get("total_tokens", 0) + sum(lengths)
    if over and too_long == "drop":
        ds = ds.filter(lambda n: n <= max_length, input_columns=LENGTH_COLUMN, desc="Dropping over-long rows")
        stats["dropped"]["too_long"] = stats["dropped"].get("too_long", 0) + over
    elif over:
        # Kept; cut at max_length tokens by the trainer (SFTConfig/DPOConfig max_length) or the recipe (PPO, GRPO).
        stats["truncated"] += over
    return ds  # the length column stays with its rows until load_data takes it off (_pop_lengths)


def _pop_lengths(ds):
    if ds is None or LENGTH_COLUMN not in ds.column_names:
        return ds, None
    return ds.remove_columns(LENGTH_COLUMN), list(ds[LENGTH_COLUMN])


def split_train_eval(ds, ratio: float, seed: int, stratify: bool = False):
    """Seeded split; classification keeps each label's share in both parts (falls back to random when a label
    has too few rows to be in both, or a part has fewer rows than there are labels)."""
    from datasets import ClassLabel, Value

    n_eval = round(len(ds) * ratio)
    if ratio <= 0 or n_eval < 1 or len(ds) - n_eval < 1:
        return ds, None
    if stratify:
        labels = sorted(set(ds["label"]))
        counts = _label_counts(ds)
        if len(labels) > 1 and min(counts.values()) >= 2 and min(n_eval, len(ds) - n_eval) >= len(labels):
            as_class = ds.cast_column("label", ClassLabel(names=[str(x) for x in range(max(labels) + 1)]))
            parts = as_class.train_test_split(test_size=n_eval, seed=seed, stratify_by_column="label")
            back = Value("int64")
            return parts["train"].cast_column("label", back), parts["test"].cast_column("label", back)
    parts = ds.train_test_split(test_size=n_eval, seed=seed)
    return parts["train"], parts["test"]


def mix(parts: list, weights: Optional[list], seed: int):
    """Mix sources: each contributes weight share of the summed size (sampled without replacement while it has
    rows, repeated beyond that), then the mix is shuffled. No weights: concatenate and shuffle."""
    total = sum(len(p) for p in parts)
    if not weights:
        return _concat(parts).shuffle(seed=seed)
    rng = random.Random(f"mix:{seed}")
    picked = []
    for part, weight in zip(parts, weights):
        want = max(1, round(total * weight / sum(weights)))
        order = list(range(len(part)))
        rng.shuffle(order)
        indices = (order * (want // len(order) + 1))[:want]
        picked.append(part.select(indices))
    return _concat(picked).shuffle(seed=seed)


def _check_weights(weights, n_sources: int):
    if weights is None:
        return None
    if not isinstance(weights, (list, tuple)) or len(weights) != n_sources:
        raise UserError(f"data.weights: give one weight per source ({n_sources}), e.g. [0.7, 0.3]")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
        raise UserError(f"data.weights: weights must be positive numbers, got {list(weights)}")
    return [float(w) for w in weights]


def _check_same_columns(parts, sources) -> None:
    def columns(ds):
        return sorted(set(ds.column_names) - {LENGTH_COLUMN})

    first = columns(parts[0])
    for part, name in zip(parts[1:], sources[1:]):
        if columns(part) != first:
            raise UserError(f"data.source: '{name}' gives columns {columns(part)} but '{sources[0]}' "
                            f"gives {first}; mix only sources of the same format")


def _concat(parts):
    import datasets

    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError:  # same columns, different Arrow types (e.g. int vs string): align on the first's features
        return datasets.concatenate_datasets([parts[0]] + [p.cast(parts[0].features) for p in parts[1:]])


def _label_counts(ds) -> dict:
    counts: dict = {}
    for label in ds["label"]:
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


# ---- padding / packing measurement -------------------------------------------------------------------------------

def bfd_pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of capacity max_length (lengths truncated to it): what TRL's packing_strategy='bfd'
    builds. Returns the lengths in each bin."""
    bins: list[list[int]] = []
    free: list[int] = []
    for n in sorted((min(n, max_length) for n in lengths), reverse=True):
        best = min((i for i, f in enumerate(free) if f >= n), key=lambda i: free[i], default=None)
        if best is None:
            bins.append([n])
            free.append(max_length - n)
        else:
            bins[best].append(n)
            free[best] -= n
    return bins


def padding_fraction(lengths: list[int], batch_size: int, packed: bool, max_length: int,
                     padding_free: bool = False) -> float:
    """Share of token slots that are padding when `lengths` are batched in order and each batch is padded to its
    longest row. packed=True first packs rows into max_length bins (BFD). padding_free=True (TRL's default with
    bfd packing) concatenates each batch into one row, so nothing is padded."""
    rows = [sum(b) for b in bfd_pack(lengths, max_length)] if packed else [min(n, max_length) for n in lengths]
    if padding_free or not rows:
        return 0.0
    slots = real = 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        slots += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / slots if slots else 0.0


def padding_share(lengths: list[int], micro_batch_size: int, max_length: int, seed: int) -> float:
    """Expected share of padding in an unpacked run's micro-batches: rows drawn in shuffled order (the trainers'
    random sampler), each micro-batch padded to its longest row (TRL's collator without packing)."""
    order = list(lengths)
    random.Random(f"padding:{seed}").shuffle(order)
    return padding_fraction(order, micro_batch_size, packed=False, max_length=max_length)
