"""Reading a `data.source` into raw rows: generated tasks (`synthetic:...`), local files and directories (.jsonl,
.json, .csv, .parquet; UTF-8 and JSON errors named by line), and hub datasets (offline cache only), with
`data.columns` renames applied. Converting, validating and splitting the rows: recipes/data.py."""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.errors import UserError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RawSource:
    name: str  # as the user wrote it
    parts: list  # [(file label, datasets.Dataset)]; one part per file so errors can name the file
    synthetic: Optional[tuple] = None  # (train rows, held-out rows) already in the kind's view
    task: str = ""


def read_source(source: str, data_cfg, kind: str, seed: int, for_eval: bool) -> RawSource:
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
        raise UserError(f"{source}: file not found ({_field(for_eval)} is resolved from {Path.cwd()})")
    else:
        parts = [(source, _read_hub(source, data_cfg, _field(for_eval)))]
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

    def option(key: str, parse, ok, need: str, default):
        if key not in options:
            return default
        try:
            value = parse(options[key])
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise UserError(f"{source}: bad synthetic option {key}={options[key]}: must be {need}; e.g. "
                            f"?max_operand=99&positive_fraction=0.3&order=natural&noise=0.5&rejected=mixed")
        return value

    def fraction(value) -> bool:
        return 0.0 <= value <= 1.0

    max_operand = option("max_operand", int, lambda v: v >= 1, "a positive integer", synthetic.DEFAULT_MAX_OPERAND)
    positive_fraction = option("positive_fraction", float, fraction, "a number in [0, 1]", 0.5)
    noise = option("noise", float, fraction, "a number in [0, 1]", 0.0)
    rejected = option("rejected", str, lambda v: v in synthetic.REJECTED,
                      f"one of {', '.join(synthetic.REJECTED)}", "near")
    order = option("order", str, lambda v: v in synthetic.ORDERS, f"one of {', '.join(synthetic.ORDERS)}",
                   synthetic.DEFAULT_ORDER)
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
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; point data.source at a file with training examples")
    builder = FILE_BUILDERS[path.suffix.lower()]
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its readers log the parse error: our line says it
    try:
        # The datasets cache is keyed on the file (path, size, mtime) and the ops applied, so a re-run with an
        # unchanged file reuses the Arrow files and every map/filter below, including tokenisation.
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # pyarrow/json parse errors: find the line ourselves for a useful message
        detail = first_bad_json_line(path) if builder == "json" else None
        cause = e
        while cause.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the parser's
            cause = cause.__cause__
        reason = detail or (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise UserError(f"{path}: could not be read as {path.suffix} ({reason}); fix the file or convert it to "
                        f"JSON Lines (one object per line)") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise UserError(f"{path}: the file has no rows; point data.source at a file with training examples")
    return ds


def _field(for_eval: bool) -> str:
    """The recipe key a source came from, for messages."""
    return "data.eval_source" if for_eval else "data.source"


def _read_hub(name: str, data_cfg, field: str):
    import datasets

    subset, split = getattr(data_cfg, "subset", None), getattr(data_cfg, "split", "train") or "train"
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{field} '{name}': no such local file, and the hub dataset could not be loaded "
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
