"""Training data: load (synthetic, local files, hub), detect the format, convert to what TRL 1.12 trainers expect,
validate every row before training, count/drop over-long rows, split train/eval, mix sources.

    bundle = load_data(cfg.data, "sft", tokenizer, seed=cfg.seed)   # -> DataBundle(train, eval, format, stats)

Formats and the conversion of each row: recipes/formats.py. Output columns per kind:
    sft             prompt/completion (strings or conversational lists), messages (chat), or text
    preference      prompt/chosen/rejected (prompt may be absent: TRL then extracts the shared prefix)
    prompts         prompt (+ answer when the data has one: reward functions score against it)
    classification  text/label (int; string labels map to sorted names, listed in stats["label_names"])
Every bad input raises UserError with one line naming the file, row and field, and the fix.
"""
from __future__ import annotations

import codecs
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.errors import UserError
from recipes.formats import FORMATS, convert, detect_format, label_mapping, require_columns

KINDS = ("sft", "preference", "prompts", "classification")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset or None (eval_ratio 0 and no eval_source)
    format: str  # detected format of the (first) training source, e.g. "alpaca", "synthetic:arith"
    stats: dict = field(default_factory=dict)  # for the run summary: rows read, dropped (with reasons), truncated, ...


def load_data(data_cfg, kind: str, tokenizer=None, seed: int = 0) -> DataBundle:
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
    too_long = getattr(data_cfg, "too_long", "truncate")
    if too_long not in ("truncate", "drop"):
        raise UserError(f"data.too_long: '{too_long}' is not one of truncate, drop")

    # Phase 1: read every source raw, so string class labels can get one mapping across all of them.
    raws = [_read_source(s, data_cfg, kind, seed + i, for_eval=False) for i, s in enumerate(sources)]
    eval_raw = _read_source(eval_source, data_cfg, kind, seed + 7919, for_eval=True) if eval_source else None
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
    stats.update(train_rows=len(train), eval_rows=len(evaluation) if evaluation is not None else 0,
                 columns=list(train.column_names), format=stats["sources"][0]["format"])
    if kind == "classification":
        stats["label_counts"] = _label_counts(train)
    return DataBundle(train=train, eval=evaluation, format=stats["format"], stats=stats)


# ---- reading ---------------------------------------------------------------------------------------------------

@dataclass
class RawSource:
    name: str  # as the user wrote it
    parts: list  # [(file label, datasets.Dataset)]; one part per file so errors can name the file
    synthetic: Optional[tuple] = None  # (train rows, held-out rows) already in the kind's view
    task: str = ""


def _read_source(source: str, data_cfg, kind: str, seed: int, for_eval: bool) -> RawSource:
    source = source.strip()
    if source.startswith("synthetic:"):
        from recipes import real_tasks  # tasks for the real pretrained models (chat_arith, sentiment)

        raw = real_tasks.read_source(source, data_cfg, kind, seed, for_eval)
        return raw if raw is not None else _read_synthetic(source, data_cfg, kind, seed, for_eval)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS)
        if not files:
            raise UserError(f"{source}: directory has no .jsonl, .json, .csv or .parquet files")
        parts = [(str(p), _read_file(p)) for p in files]
    elif path.is_file():
        if path.suffix.lower() not in FILE_BUILDERS:
            raise UserError(f"{source}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
        parts = [(source, _read_file(path))]
    elif path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/", "~")) or "\\" in source:
        raise UserError(f"{source}: file not found (data.source is resolved from {Path.cwd()})")
    else:
        parts = [(source, _read_hub(source, data_cfg))]
    parts = [(label, _apply_column_map(ds, getattr(data_cfg, "columns", None) or {}, label)) for label, ds in parts]
    return RawSource(name=source, parts=parts)


def synthetic_counts(data_cfg, for_eval: bool) -> tuple[int, int]:
    """(train rows, held-out rows) a generated source makes: `data.num_examples` split by `data.eval_ratio`; all of
    them for training when a separate `data.eval_source` exists; only the held-out share when it is that source."""
    n = int(getattr(data_cfg, "num_examples", 2000))
    ratio = float(getattr(data_cfg, "eval_ratio", 0.1) or 0.0)
    if for_eval:
        return 0, max(1, round(n * ratio))
    if getattr(data_cfg, "eval_source", None):
        return n, 0
    n_eval = round(n * ratio)
    return n - n_eval, n_eval


def _read_synthetic(source: str, data_cfg, kind: str, seed: int, for_eval: bool) -> RawSource:
    from recipes import synthetic

    spec, _, query = source[len("synthetic:"):].partition("?")
    options = dict(item.split("=", 1) for item in query.split("&") if "=" in item)
    unknown = set(options) - {"max_operand", "positive_fraction", "order", "noise", "rejected"}
    if spec not in synthetic.TASKS or unknown:
        what = f"option(s) {', '.join(sorted(unknown))}" if unknown and spec in synthetic.TASKS else f"task '{spec}'"
        raise UserError(f"{source}: unknown synthetic {what}; use synthetic:arith or synthetic:reverse "
                        f"(options: ?max_operand=N&positive_fraction=F&order=reversed|natural&noise=F"
                        f"&rejected=near|mixed), or synthetic:chat_arith / synthetic:sentiment for the real models")
    try:
        max_operand = int(options.get("max_operand", synthetic.DEFAULT_MAX_OPERAND))
        positive_fraction = float(options.get("positive_fraction", 0.5))
        noise = float(options.get("noise", 0.0))
        rejected = options.get("rejected", "near")
        order = options.get("order", synthetic.DEFAULT_ORDER)
        synthetic.format_number(0, order)  # raises ValueError for an unknown order
        if max_operand < 1 or not 0.0 <= noise <= 1.0 or rejected not in synthetic.REJECTED:
            raise ValueError(max_operand)
    except ValueError:
        raise UserError(f"{source}: bad synthetic option; e.g. ?max_operand=99&positive_fraction=0.3"
                        f"&order=natural&noise=0.5&rejected=mixed") from None
    n_train, n_eval = synthetic_counts(data_cfg, for_eval)
    train_rows, eval_rows = synthetic.make_split(spec, n_train, n_eval, seed, max_operand=max_operand, order=order)
    if for_eval:
        train_rows, eval_rows = eval_rows, []

    def view(rows, s, noise):
        return synthetic.make_view(kind, rows, s, positive_fraction=positive_fraction, order=order, noise=noise,
                                   rejected=rejected)

    # Noisy demonstrations are a training condition: held-out rows keep the true answers they are scored against.
    train_noise = 0.0 if for_eval else noise
    return RawSource(name=source, parts=[], synthetic=(view(train_rows, seed, train_noise),
                                                       view(eval_rows, seed + 1, 0.0) or None),
                     task=spec)


def _read_file(path: Path):
    import datasets

    if path.suffix.lower() != ".parquet":
        check_utf8(path)
    builder = FILE_BUILDERS[path.suffix.lower()]
    try:
        # The datasets cache is keyed on the file (path, size, mtime) and the ops applied, so a re-run with an
        # unchanged file reuses the Arrow files and every map/filter below, including tokenisation.
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # pyarrow/json parse errors: find the line ourselves for a useful message
        detail = first_bad_json_line(path) if builder == "json" else None
        reason = detail or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: could not be read as {path.suffix} ({reason}); fix the file or convert it to "
                        f"JSON Lines (one object per line)") from None
    if len(ds) == 0:
        raise UserError(f"{path}: the file has no rows; point data.source at a file with training examples")
    return ds


def _read_hub(name: str, data_cfg):
    import datasets

    subset, split = getattr(data_cfg, "subset", None), getattr(data_cfg, "split", "train") or "train"
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"data.source '{name}': no such local file, and the hub dataset could not be loaded "
                        f"offline ({type(e).__name__}: {first}); download it elsewhere and pass a local "
                        f".jsonl/.parquet file or directory") from None


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Fail with the line number of the first byte that is not UTF-8 (pyarrow's own error names no line)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes fed to the decoder before this chunk
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object = bytes the decoder still held from earlier chunks + this chunk
                bad_at = offset - (len(e.object) - len(chunk)) + e.start
                with open(path, "rb") as again:
                    line = again.read(bad_at).count(b"\n") + 1
                raise UserError(f"{path} line {line}: byte 0x{e.object[e.start]:02x} is not valid UTF-8; "
                                f"re-save the file as UTF-8") from None
            if not chunk:
                return
            offset += len(chunk)


def _apply_column_map(ds, columns: dict, label: str):
    """`data.columns` maps our names to the user's: {prompt: question, completion: answer}."""
    if not columns:
        return ds
    if not isinstance(columns, dict):
        raise UserError("data.columns: expected a mapping of our names to yours, e.g. {prompt: question}")
    renames = {}
    for ours, theirs in columns.items():
        if theirs not in ds.column_names:
            raise UserError(f"data.columns maps '{ours}' to column '{theirs}', which {label} lacks "
                            f"(its columns: {', '.join(ds.column_names)})")
        if theirs != ours:
            renames[theirs] = ours
    clashing = [ours for ours in renames.values() if ours in ds.column_names and ours not in renames]
    if clashing:  # the mapping says which column the user wants; an unmapped column of the same name must go
        ds = ds.remove_columns(clashing)
    return ds.rename_columns(renames)


def first_bad_json_line(path: Path) -> Optional[str]:
    """Our own parse of a JSON/JSONL file that pyarrow rejected, to say which line is wrong."""
    import json

    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: {e.msg}"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}: {e.msg}"
        if not isinstance(value, dict):
            return f"line {number}: expected a JSON object per line, got {type(value).__name__}"
    return None


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
    return {"_n_tokens": lengths}


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
    lengths = list(ds["_n_tokens"])
    over = sum(1 for n in lengths if n > max_length)
    stats["max_tokens"] = max([stats.get("max_tokens", 0)] + lengths)
    stats["total_tokens"] = stats.get("total_tokens", 0) + sum(lengths)
    if over and too_long == "drop":
        ds = ds.filter(lambda n: n <= max_length, input_columns="_n_tokens", desc="Dropping over-long rows")
        stats["dropped"]["too_long"] = stats["dropped"].get("too_long", 0) + over
    elif over:
        # Kept; cut at max_length tokens by the trainer (SFTConfig/DPOConfig max_length) or the recipe (PPO, GRPO).
        stats["truncated"] += over
    return ds.remove_columns("_n_tokens")


def split_train_eval(ds, ratio: float, seed: int, stratify: bool = False):
    """Seeded split; classification keeps each label's share in both parts (falls back to random when a label
    has too few rows to be in both)."""
    from datasets import ClassLabel, Value

    n_eval = round(len(ds) * ratio)
    if ratio <= 0 or n_eval < 1 or len(ds) - n_eval < 1:
        return ds, None
    if stratify:
        labels = sorted(set(ds["label"]))
        counts = _label_counts(ds)
        if len(labels) > 1 and min(counts.values()) >= 2:
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
    first = set(parts[0].column_names)
    for part, name in zip(parts[1:], sources[1:]):
        if set(part.column_names) != first:
            raise UserError(f"data.source: '{name}' gives columns {sorted(part.column_names)} but '{sources[0]}' "
                            f"gives {sorted(first)}; mix only sources of the same format")


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
