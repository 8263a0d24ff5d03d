"""Tasks for the real pretrained models (SmolLM2-135M-Instruct, MiniLM-L6), where a fine-tune shows a visible change.

Pure Python (no torch, no datasets), like `recipes.synthetic`; `data.source: synthetic:<task>` reaches them through
`read_source` (the hook in recipes/data.py).

Tasks
  chat_arith  "What is 23+45?" in SmolLM2's chat template; the answer is the bare number ("68"). Untrained, the
              instruct model restates the sum ("23 + 45 = 68."), so exact match of the first word starts at 0 and rises
              as it learns the format (and is capped by how often its arithmetic is right).
              Options: ?max_operand=N (default 49) &template=chatml|plain (plain: the user text alone).
  sentiment   short product/film reviews for a classifier: text/label (1 positive, 0 negative). The held-out rows
              use adjectives and subjects the training rows never contain, so accuracy measures what the encoder
              brings from pre-training, not memorised words. About a third are negated ("not bad" is positive).

Kinds: chat_arith gives sft (prompt/completion strings), preference (chosen = the bare number; rejected =
alternately the restated sum the model prefers before training, and a bare number with the tens digit off by one)
and prompts (prompt + answer); sentiment gives classification, and sft (a one-word chat answer, "positive"/"negative").
"""
from __future__ import annotations

import random
import re

from launcher.errors import UserError
from recipes import synthetic

TASKS = ("chat_arith", "sentiment")

# SmolLM2-Instruct's chat template, rendered: with no system message it adds this one. Written out (not rendered
# with the tokenizer) because data sources are read before any tokenizer exists; tests/test_real_models.py checks
# it is byte-identical to `apply_chat_template(..., add_generation_prompt=True)` of the converted model.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATES = ("chatml", "plain")


def chatml_prompt(user: str, system: str = SMOLLM2_SYSTEM) -> str:
    """The rendered chat prompt up to the assistant's turn: what greedy evaluation feeds and training conditions on."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def arith_question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def verbose_answer(a: int, b: int) -> str:
    """How the instruct model answers before training (restating the sum)."""
    return f"{a} + {b} = {a + b}."


def rejected_answer(a: int, b: int, i: int) -> str:
    """The rejected side of DPO pairs, alternating: the restated sum the model prefers before training (teaches the
    format), and a bare number with the slip the model makes most (tens digit off by one; else units off by one),
    which teaches that the number must be right: with only the first kind, DPO learns the format and the sums
    get worse."""
    if i % 2 == 0:
        return verbose_answer(a, b)
    total = a + b
    return str(total + 10 if (i // 2) % 2 == 0 or total < 10 else total - 10)


_OPERANDS = re.compile(r"^(\d+)\+(\d+)=$")


def chat_arith_examples(n_train: int, n_eval: int, seed: int, max_operand: int = synthetic.DEFAULT_MAX_OPERAND,
                        template: str = "chatml") -> tuple[list[dict], list[dict]]:
    """(train, eval) base rows {prompt, answer, a, b}; eval prompts never occur in train (synthetic.make_split)."""
    render = chatml_prompt if template == "chatml" else (lambda user: user)
    train, held = synthetic.make_split("arith", n_train, n_eval, seed, max_operand=max_operand)

    def convert(rows):
        out = []
        for r in rows:
            a, b = map(int, _OPERANDS.match(r["prompt"]).groups())
            # the answer written the usual way: synthetic's arith default is units-digit-first, for tiny models
            out.append({"prompt": render(arith_question(a, b)), "answer": str(a + b), "a": a, "b": b})
        return out

    return convert(train), convert(held)


# ---- sentiment --------------------------------------------------------------------------------------------------

# (train words, held-out words): disjoint, so eval accuracy is transfer from pre-training, not memorisation.
_POSITIVE = (["great", "wonderful", "excellent", "fantastic", "lovely", "delightful", "brilliant", "superb",
              "charming", "impressive"],
             ["amazing", "outstanding", "terrific", "marvelous", "enjoyable", "pleasant"])
_NEGATIVE = (["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "annoying",
              "useless", "painful"],
             ["bad", "miserable", "dull", "mediocre", "frustrating", "unpleasant"])
_SUBJECTS = (["the movie", "this phone", "the hotel", "the food", "this book", "the service", "the concert",
              "this game"],
             ["the laptop", "the restaurant", "this album", "the show"])
_FRAMES = ["{s} was {adv}{w}.", "honestly, {s} is {adv}{w}.", "i found {s} {adv}{w}.", "{s}? {adv}{w}.",
           "my friends said {s} was {adv}{w}, and they were right."]
_NEG_FRAMES = ["{s} was not {w} at all.", "i would not call {s} {w}.", "{s} is far from {w}."]
_ADVERBS = ["", "really ", "truly ", "quite ", "very "]


def sentiment_examples(n: int, seed: int, held_out: bool) -> list[dict]:
    """`n` rows {text, label}; about a third negated (label flips). Deterministic in (n, seed, held_out)."""
    part = 1 if held_out else 0
    rng = random.Random(f"sentiment:{seed}:{part}")
    rows = []
    for _ in range(n):
        positive_word = rng.random() < 0.5
        word = rng.choice((_POSITIVE if positive_word else _NEGATIVE)[part])
        subject = rng.choice(_SUBJECTS[part])
        negated = rng.random() < 1 / 3
        if negated:
            text = rng.choice(_NEG_FRAMES).format(s=subject, w=word)
        else:
            text = rng.choice(_FRAMES).format(s=subject, w=word, adv=rng.choice(_ADVERBS))
        text = text[0].upper() + text[1:]
        rows.append({"text": text, "label": int(positive_word != negated)})
    return rows


# ---- views ---------------------------------------------------------------------------------------------------------

def _chat_arith_view(kind: str, rows: list[dict]) -> list[dict]:
    if kind == "sft":
        return synthetic.sft_rows(rows)
    if kind == "preference":
        return [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": rejected_answer(r["a"], r["b"], i)}
                for i, r in enumerate(rows)]
    if kind == "prompts":
        return synthetic.prompt_rows(rows)
    raise UserError(f"synthetic:chat_arith has no '{kind}' view (it gives sft, preference, prompts); "
                    f"for classification use synthetic:sentiment or synthetic:arith")


def _sentiment_view(kind: str, rows: list[dict], template: str) -> list[dict]:
    if kind == "classification":
        return [{"text": r["text"], "label": r["label"]} for r in rows]
    if kind == "sft":
        render = chatml_prompt if template == "chatml" else (lambda user: user)
        return [{"prompt": render(f"Is this review positive or negative? Answer with one word.\n{r['text']}"),
                 "completion": "positive" if r["label"] else "negative"} for r in rows]
    raise UserError(f"synthetic:sentiment has no '{kind}' view (it gives classification, sft)")


# ---- the data hook ------------------------------------------------------------------------------------------------

def parse(source: str):
    """'synthetic:chat_arith?max_operand=20' -> ('chat_arith', {'max_operand': '20'}), or None when not ours."""
    if not source.startswith("synthetic:"):
        return None
    spec, _, query = source[len("synthetic:"):].partition("?")
    if spec not in TASKS:
        return None
    return spec, dict(item.split("=", 1) for item in query.split("&") if "=" in item)


def make_rows(spec: str, options: dict, kind: str, n_train: int, n_eval: int, seed: int,
              source: str = "") -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of task `spec` in the view `kind` wants."""
    allowed = {"chat_arith": {"max_operand", "template"}, "sentiment": {"template"}}[spec]
    unknown = set(options) - allowed
    if unknown:
        raise UserError(f"{source or spec}: unknown option(s) {', '.join(sorted(unknown))}; "
                        f"synthetic:{spec} takes {', '.join(sorted(allowed))}")
    template = options.get("template", "chatml")
    if template not in TEMPLATES:
        raise UserError(f"{source or spec}: template={template} is not one of {', '.join(TEMPLATES)}")
    if spec == "chat_arith":
        try:
            max_operand = int(options.get("max_operand", synthetic.DEFAULT_MAX_OPERAND))
        except ValueError:
            raise UserError(f"{source}: max_operand must be a whole number, e.g. ?max_operand=20") from None
        train, held = chat_arith_examples(n_train, n_eval, seed, max_operand=max_operand, template=template)
        return _chat_arith_view(kind, train), _chat_arith_view(kind, held)
    train = sentiment_examples(n_train, seed, held_out=False)
    held = sentiment_examples(n_eval, seed, held_out=True)
    return _sentiment_view(kind, train, template), _sentiment_view(kind, held, template)


def read_source(source: str, data_cfg, kind: str, seed: int, for_eval: bool):
    """recipes.data's RawSource for `synthetic:<one of TASKS>`, or None for any other source (the caller goes on).

    Row counts follow synthetic sources exactly: `data.num_examples` split by `data.eval_ratio`, or all of them for
    training (or for eval, when this is `data.eval_source`)."""
    parsed = parse(source.strip())
    if parsed is None:
        return None
    from recipes.data_sources import RawSource, synthetic_counts

    spec, options = parsed
    n_train, n_eval = synthetic_counts(data_cfg, for_eval)
    train, held = make_rows(spec, options, kind, n_train, n_eval, seed, source=source)
    if for_eval:
        train, held = held, []
    return RawSource(name=source, parts=[], synthetic=(train, held or None), task=spec)
