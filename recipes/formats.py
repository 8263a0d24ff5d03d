"""Data formats: detect a source's format from its columns, check the columns it needs, and convert every row to the
columns TRL 1.12 trainers expect for a kind of training, validating as it goes (errors name the file, row, field).

    fmt = detect_format(ds.column_names, label)      # text, alpaca, messages, prompt_completion, preference, ...
    require_columns(fmt, ds.column_names, label)
    ds = convert(ds, fmt, kind, label, label_map)    # a datasets map: cached with the file

Loading, splitting and mixing sources is recipes/data.py.
"""
from __future__ import annotations

from typing import Optional

from launcher.errors import UserError

FORMATS = ("text", "alpaca", "messages", "prompt_completion", "preference", "prompts", "classification")
REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "messages": ("messages",),
            "prompt_completion": ("prompt", "completion"), "preference": ("chosen", "rejected"),
            "prompts": ("prompt",), "classification": ("text", "label")}
# Which formats each kind can train on (anything else is a clear error, never a silent reinterpretation).
ACCEPTS = {"sft": ("text", "alpaca", "messages", "prompt_completion", "preference"),
           "preference": ("preference",),
           "prompts": ("prompts", "prompt_completion", "alpaca", "messages", "preference"),
           "classification": ("classification",)}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_FIX = "fix the row, or map your column names with data.columns"


def detect_format(columns: list, label: str) -> str:
    cols = set(columns)
    if "messages" in cols or "conversations" in cols:
        return "messages"
    for fmt in ("preference", "alpaca", "classification", "prompt_completion", "prompts", "text"):
        if set(REQUIRED[fmt]) <= cols:
            return fmt
    raise UserError(f"{label}: cannot tell the data format from columns {', '.join(columns)}; set data.format "
                    f"(one of {', '.join(FORMATS)}) or rename columns with data.columns, e.g. {{prompt: question}}")


def require_columns(fmt: str, columns: list, label: str) -> None:
    needed = REQUIRED[fmt] if not (fmt == "messages" and "conversations" in columns) else ()
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"{label}: format '{fmt}' needs column(s) {', '.join(missing)} but the data has "
                        f"{', '.join(columns)}; map yours with data.columns, e.g. {{{missing[0]}: your_column}}")


def output_columns(fmt: str, kind: str, columns: list) -> tuple:
    if kind == "sft":
        return {"text": ("text",), "messages": ("messages",)}.get(fmt, ("prompt", "completion"))
    if kind == "preference":
        return (("prompt",) if "prompt" in columns else ()) + ("chosen", "rejected")
    if kind == "prompts":
        has_answer = fmt != "preference" and (fmt != "prompts" or "answer" in columns)
        return ("prompt", "answer") if has_answer else ("prompt",)
    return ("text", "label")


def convert(ds, fmt: str, kind: str, label: str, label_map: Optional[dict]):
    """Map the user's rows to the kind's columns, validating each row (errors name file, row and field).
    Runs as a datasets `map`, so the result is cached with the file: a re-run skips it and TRL's tokenisation."""
    if fmt not in ACCEPTS[kind]:
        raise UserError(f"{label}: format '{fmt}' cannot train this method (it needs {kind} data: "
                        f"{' or '.join(ACCEPTS[kind])}); point data.source at suitable data or set data.format")
    if kind == "sft" and fmt == "preference" and "prompt" not in ds.column_names:
        raise UserError(f"{label}: SFT on preference data needs a 'prompt' column (the chosen answer becomes "
                        f"the completion); add it or map it with data.columns")
    out_cols = output_columns(fmt, kind, ds.column_names)
    converted = ds.map(_convert_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                       fn_kwargs={"fmt": fmt, "kind": kind, "label": label, "label_map": label_map,
                                  "out_cols": out_cols}, desc=f"Checking {fmt} rows")
    # Written under temporary names: `map` keeps an input column's Arrow type for a same-named output, which would
    # turn the text "19" (from a CSV's inferred int column) back into 19.
    return converted.rename_columns({f"_out_{c}": c for c in out_cols})


def _convert_batch(batch, indices, fmt, kind, label, label_map, out_cols):
    out = {f"_out_{c}": [] for c in out_cols}
    names = list(batch)
    for j, index in enumerate(indices):
        row = {name: batch[name][j] for name in names}
        converted = _convert_row(row, fmt, kind, f"{label} row {index + 1}", label_map)
        for c in out_cols:
            out[f"_out_{c}"].append(converted[c])
    return out


def _convert_row(row: dict, fmt: str, kind: str, where: str, label_map) -> dict:
    def text(field, optional=False, conversational=False):
        value = row.get(field)
        if isinstance(value, float) and value != value:  # NaN: pandas' spelling of an empty CSV cell
            value = None
        if conversational and isinstance(value, list):
            return _messages(value, f"{where}: '{field}'")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # CSV type inference turns "19" into 19
        if value is None or (isinstance(value, str) and not value.strip()):
            if optional:
                return ""
            raise UserError(f"{where}: missing or empty '{field}' (format {fmt} needs "
                            f"{', '.join(REQUIRED[fmt])}); {_FIX}")
        if not isinstance(value, str):
            raise UserError(f"{where}: '{field}' must be a string, got {type(value).__name__}; {_FIX}")
        return value

    if fmt == "messages":
        raw = row.get("messages") if row.get("messages") is not None else row.get("conversations")
        messages = _messages(raw, f"{where}: 'messages'")
        if kind == "sft":
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where}: 'messages' has no assistant turn to learn from; {_FIX}")
            return {"messages": messages}
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt = messages[:last]
        if not any(m["role"] == "user" for m in prompt):
            raise UserError(f"{where}: 'messages' has no user turn to use as a prompt; {_FIX}")
        return {"prompt": prompt, "answer": messages[last]["content"] if last < len(messages) else ""}
    if fmt == "text":
        return {"text": text("text")}
    if fmt == "classification":
        return {"text": text("text"), "label": _label(row.get("label"), where, label_map)}
    if fmt == "alpaca":
        instruction, extra, output = text("instruction"), text("input", optional=True), text("output")
        prompt = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "") + \
            "### Response:\n"
        return {"prompt": prompt, "completion": output, "answer": output}
    conv = True  # prompt/completion/chosen/rejected may each be a string or a list of chat messages
    prompt = text("prompt", optional=(fmt == "preference" and kind == "preference"), conversational=conv)
    if fmt == "prompts":
        answer = row.get("answer")
        return {"prompt": prompt, "answer": "" if answer is None else str(answer)}
    if fmt == "prompt_completion":
        completion = text("completion", conversational=conv)
        if isinstance(prompt, list) != isinstance(completion, list):
            raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
        return {"prompt": prompt, "completion": completion, "answer": completion}
    chosen, rejected = text("chosen", conversational=conv), text("rejected", conversational=conv)
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn; "
                        f"fix or remove the row")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "completion": chosen}


def _messages(value, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a non-empty list of {{role, content}} messages; {_FIX}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise UserError(f"{where}[{i}] must be a {{role, content}} object, got {type(message).__name__}")
        # Arrow gives every message the union of keys seen in the file, absent ones as None: test values, not keys
        role = message.get("role")
        if role is None and message.get("from") is not None:  # ShareGPT: {from: human|gpt, value: ...}
            role = SHAREGPT_ROLES.get(message["from"], message["from"])
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if role not in ROLES:
            raise UserError(f"{where}[{i}]: role {role!r} is not one of {', '.join(ROLES)}; {_FIX}")
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}]: missing 'content' (a string); {_FIX}")
        out.append({"role": role, "content": content})
    return out


def _label(value, where: str, label_map: Optional[dict]) -> int:
    if label_map:
        if value is None or str(value) not in label_map:
            raise UserError(f"{where}: missing 'label'; every classification row needs one; {_FIX}")
        return label_map[str(value)]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value == value and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: 'label' must be a class index (0, 1, ...) or a class name, got {value!r}; {_FIX}")
    return value


def label_mapping(raws: list) -> Optional[dict]:
    """One name->index mapping for string class labels across all sources (train and eval alike), sorted so it is
    the same on every rank and every run. Numeric labels need no mapping."""
    values = set()
    for raw in raws:
        for _, ds in raw.parts:
            if "label" in ds.column_names:
                values.update(v for v in ds.unique("label") if v is not None)
    names = {str(v) for v in values if isinstance(v, str) and not v.strip().isdigit()}
    if not names:
        return None
    return {name: i for i, name in enumerate(sorted({str(v) for v in values}))}
