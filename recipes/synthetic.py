"""The project's synthetic tasks: small enough for a tiny model to learn on a 2-core CPU in minutes.

Pure Python (no torch, no datasets) so tests and the planner can import it for free.

Tasks
  arith    two-number addition, prompt "12+7=", operands 0..max_operand (default 49). The answer is written
           units digit first ("91" for 19) by default: each answer digit then only needs digits and a carry the
           model has already seen. Measured (tiny Llama, full SFT, 2000 rows, batch 32, lr 1e-3 cosine, 600 steps,
           ~20 s on 2 cores; exact match on 200 unseen sums, seeds 0/1/2): units-first 92 / 97.5 / 77.5 %,
           natural order ("19", order="natural") 15.5 / 68 / 27 %. lr 3e-3 is too high for either.
  reverse  reverse a short lowercase string, prompt "rev abc=" answer "cba"

`make_examples` yields base rows {prompt, answer}; the `*_rows` views turn them into what each kind of training
wants (sft, preference, prompts, classification). `make_split` keeps eval prompts disjoint from train prompts so
eval accuracy measures generalisation, not memorisation.
"""
from __future__ import annotations

import random
import re
from typing import Iterable, Optional

TASKS = ("arith", "reverse")
DEFAULT_MAX_OPERAND = 49  # 50x50 = 2500 distinct sums: learnable, and enough for a disjoint eval split
ORDERS = ("reversed", "natural")  # how arith answers are written: units digit first, or the usual way
DEFAULT_ORDER = "reversed"
_REVERSE_ALPHABET = "abcdefghij"
_ARITH_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")
_REVERSE_PROMPT = re.compile(r"^\s*rev ([a-z]+)=\s*$")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task '{task}'; choose one of {', '.join(TASKS)}")


def format_number(value: int, order: str = DEFAULT_ORDER) -> str:
    if order not in ORDERS:
        raise ValueError(f"unknown answer order '{order}'; choose one of {', '.join(ORDERS)}")
    return str(value)[::-1] if order == "reversed" else str(value)


def read_number(text: str, order: str = DEFAULT_ORDER) -> int:
    return int(text[::-1] if order == "reversed" else text)


def _draw(task: str, rng: random.Random, max_operand: int, order: str) -> dict:
    if task == "arith":
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return {"prompt": f"{a}+{b}=", "answer": format_number(a + b, order)}
    word = "".join(rng.choice(_REVERSE_ALPHABET) for _ in range(rng.randint(3, 6)))
    return {"prompt": f"rev {word}=", "answer": word[::-1]}


def _space_size(task: str, max_operand: int) -> int:
    if task == "arith":
        return (max_operand + 1) ** 2
    return sum(len(_REVERSE_ALPHABET) ** k for k in range(3, 7))


def make_examples(task: str, n: int, seed: int, *, max_operand: int = DEFAULT_MAX_OPERAND,
                  order: str = DEFAULT_ORDER, exclude: Iterable[str] = ()) -> list[dict]:
    """`n` rows {prompt, answer}, deterministic in (task, n, seed). Prompts are distinct while the task's space
    (minus `exclude`) allows; beyond that they repeat rather than fail, because callers ask for a row count."""
    _check_task(task)
    rng = random.Random(f"{task}:{seed}:{max_operand}")  # string seeds are stable across Python runs
    excluded = set(exclude)
    available = _space_size(task, max_operand) - len(excluded)
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        row = _draw(task, rng, max_operand, order)
        if row["prompt"] in excluded:
            continue
        if row["prompt"] in seen and len(seen) < available:
            continue  # still distinct prompts to find; with 2500 arith prompts rejection stays cheap
        seen.add(row["prompt"])
        rows.append(row)
    return rows


def make_split(task: str, n_train: int, n_eval: int, seed: int, *, max_operand: int = DEFAULT_MAX_OPERAND,
               order: str = DEFAULT_ORDER) -> tuple[list[dict], list[dict]]:
    """Train and eval rows whose prompts never overlap (eval is drawn first, then excluded from train)."""
    eval_rows = make_examples(task, n_eval, seed + 1_000_003, max_operand=max_operand, order=order)
    train_rows = make_examples(task, n_train, seed, max_operand=max_operand, order=order,
                               exclude={r["prompt"] for r in eval_rows})
    return train_rows, eval_rows


def solve(prompt: str, order: str = DEFAULT_ORDER) -> Optional[str]:
    """The correct answer of a synthetic prompt, or None when the prompt is not one of ours."""
    m = _ARITH_PROMPT.match(prompt)
    if m:
        return format_number(int(m.group(1)) + int(m.group(2)), order)
    m = _REVERSE_PROMPT.match(prompt)
    if m:
        return m.group(1)[::-1]
    return None


def wrong_answer(prompt: str, answer: str, rng: random.Random, order: str = DEFAULT_ORDER) -> str:
    """A plausible mistake: off by a small amount (arith) or a near-miss string (reverse); never equal to answer."""
    if answer.isdigit():
        value = read_number(answer, order)
        choices = [value + d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0]
        return format_number(rng.choice(choices), order)
    if len(answer) >= 2:
        # the un-reversed word is the classic mistake; fall back to a swap when the word is a palindrome
        word = answer[::-1]
        if word != answer:
            return word
        chars = list(answer)
        i = rng.randrange(len(chars))
        chars[i] = next(c for c in _REVERSE_ALPHABET if c != chars[i])
        return "".join(chars)
    return answer + answer[-1:] if answer else "0"


# ---- views: one per kind of training -------------------------------------------------------------------------

# The non-answer of noisy demonstrations: SFT data where some answers are "idk" gives a policy that answers about
# half the prompts that way, which preference training (rejected=mixed) can then fix -- the RLHF story rlhf_tiny tells.
NON_ANSWER = "idk"
REJECTED = ("near", "mixed")


def sft_rows(examples: list[dict], seed: int = 0, noise: float = 0.0) -> list[dict]:
    """prompt/completion; with `noise`, that fraction of completions (exactly, seeded) is NON_ANSWER instead."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    noisy = set(random.Random(f"noise:{seed}").sample(range(len(examples)), round(len(examples) * noise)))
    return [{"prompt": e["prompt"], "completion": NON_ANSWER if i in noisy else e["answer"]}
            for i, e in enumerate(examples)]


def preference_rows(examples: list[dict], seed: int, order: str = DEFAULT_ORDER, rejected: str = "near") -> list[dict]:
    """chosen = the answer; rejected = a plausible mistake (`near`), or alternately NON_ANSWER and a plausible
    mistake (`mixed`)."""
    if rejected not in REJECTED:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED)}, got {rejected}")
    rng = random.Random(f"preference:{seed}")
    return [{"prompt": e["prompt"], "chosen": e["answer"],
             "rejected": NON_ANSWER if (rejected == "mixed" and i % 2 == 0) else wrong_answer(
                 e["prompt"], e["answer"], rng, order)} for i, e in enumerate(examples)]


def prompt_rows(examples: list[dict]) -> list[dict]:
    # `answer` stays so reward functions (GRPO) and eval can score generations without re-solving
    return [{"prompt": e["prompt"], "answer": e["answer"]} for e in examples]


def classification_rows(examples: list[dict], seed: int, positive_fraction: float = 0.5,
                        order: str = DEFAULT_ORDER) -> list[dict]:
    """`text` is prompt+answer (label 1) or prompt+wrong answer (label 0); `positive_fraction` sets the imbalance.
    The count of positives is exact (round(n * fraction)), so stratification tests see the intended ratio."""
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    rng = random.Random(f"classification:{seed}")
    n_pos = round(len(examples) * positive_fraction)
    positive = set(rng.sample(range(len(examples)), n_pos))
    rows = []
    for i, e in enumerate(examples):
        shown = e["answer"] if i in positive else wrong_answer(e["prompt"], e["answer"], rng, order)
        rows.append({"text": e["prompt"] + shown, "label": int(i in positive)})
    return rows


def make_view(kind: str, examples: list[dict], seed: int, positive_fraction: float = 0.5,
              order: str = DEFAULT_ORDER, noise: float = 0.0, rejected: str = "near") -> list[dict]:
    if kind == "sft":
        return sft_rows(examples, seed, noise)
    if kind == "preference":
        return preference_rows(examples, seed, order, rejected)
    if kind == "prompts":
        return prompt_rows(examples)
    if kind == "classification":
        return classification_rows(examples, seed, positive_fraction, order)
    raise ValueError(f"unknown kind '{kind}'; choose one of sft, preference, prompts, classification")


# ---- scoring ---------------------------------------------------------------------------------------------------

def text_of(item) -> str:
    """Completions/prompts from TRL are strings, or conversational lists of {role, content}."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item:
        last = item[-1]
        return last.get("content", "") if isinstance(last, dict) else str(last)
    if isinstance(item, dict):
        return item.get("content", "")
    return ""


def last_user_text(prompt) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else text_of(prompt)
    return text_of(prompt)




def first_answer(completion: str) -> str:
    """The model's answer: the completion's first word, cut at any end-of-text/turn marker."""
    text = completion
    for stop in ("</s>", "<|", "\n"):
        text = text.split(stop, 1)[0]
    words = text.split()
    return words[0] if words else ""


def exact_match(prediction: str, answer: str) -> bool:
    return first_answer(text_of(prediction)) == str(answer).strip()


def arith_reward(prompts, completions, answer=None, order: str = DEFAULT_ORDER, **kwargs) -> list[float]:
    """GRPO reward: 1.0 when the completion starts with the exact answer (then stops: end, space or non-digit);
    0.1 for a digits-only wrong number (right shape, so the policy gets a gradient toward answering with a number);
    0.0 otherwise. `answer` arrives from the dataset's column when present; else it is solved from the prompt."""
    rewards = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        target = answer[i] if answer is not None else solve(last_user_text(prompt), order)
        text = text_of(completion).lstrip()
        if target is None:
            rewards.append(0.0)
            continue
        target = str(target)
        head = re.match(r"[0-9a-z]+", text)
        token = head.group(0) if head else ""
        if token == target:
            rewards.append(1.0)
        elif token.isdigit() and target.isdigit():
            rewards.append(0.1)
        else:
            rewards.append(0.0)
    return rewards
