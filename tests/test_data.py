"""Data layer: synthetic tasks, tiny tokenizer/model config, format detection/conversion, validation, splitting,
length handling, mixing and the padding helpers. Fast: no training."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from launcher.config import DataSection
from launcher.errors import UserError
from recipes import synthetic
from recipes.data import LENGTH_COLUMN, DataBundle, bfd_pack, count_tokens, load_data, padding_fraction, padding_share


@pytest.fixture(scope="module")
def tok():
    from recipes.tiny import tiny_tokenizer

    return tiny_tokenizer()


def cfg(**overrides) -> DataSection:
    return dataclasses.replace(DataSection(), **overrides)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def rows_of(ds):
    return ds.to_list()


# ---- synthetic ---------------------------------------------------------------------------------------------------

def test_synthetic_deterministic_and_correct():
    a = synthetic.make_examples("arith", 300, seed=3)
    assert a == synthetic.make_examples("arith", 300, seed=3)
    assert a != synthetic.make_examples("arith", 300, seed=4)
    assert len({r["prompt"] for r in a}) == 300  # distinct while the space allows
    for row in a:
        left, right = row["prompt"].rstrip("=").split("+")
        assert 0 <= int(left) <= 49 and 0 <= int(right) <= 49
        # default: units digit first (what a tiny model learns fast); order="natural" writes it the usual way
        assert row["answer"] == str(int(left) + int(right))[::-1] == synthetic.solve(row["prompt"])
    natural = synthetic.make_examples("arith", 50, seed=3, order="natural")
    assert [r["prompt"] for r in natural] == [r["prompt"] for r in a[:50]]
    assert all(r["answer"] == synthetic.solve(r["prompt"], "natural") == str(eval(r["prompt"][:-1]))
               for r in natural)
    for row in synthetic.make_examples("reverse", 50, seed=0):
        assert row["answer"] == row["prompt"][4:-1][::-1] == synthetic.solve(row["prompt"])


def test_synthetic_more_rows_than_distinct_prompts():
    rows = synthetic.make_examples("arith", 30, seed=0, max_operand=3)  # only 16 distinct prompts
    assert len(rows) == 30 and len({r["prompt"] for r in rows}) == 16


def test_synthetic_split_is_disjoint():
    train, held = synthetic.make_split("arith", 2000, 200, seed=0)
    assert len(train) == 2000 and len(held) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_noisy_demonstrations_and_mixed_rejections():
    """rlhf_tiny's data: SFT answers replaced by the non-answer at an exact rate (training rows only), preference
    pairs whose rejected side alternates between the non-answer and a near miss."""
    from types import SimpleNamespace

    base = synthetic.make_examples("arith", 200, seed=1)
    noisy = synthetic.sft_rows(base, seed=1, noise=0.5)
    assert sum(r["completion"] == synthetic.NON_ANSWER for r in noisy) == 100
    assert all(r["completion"] in (e["answer"], synthetic.NON_ANSWER) for r, e in zip(noisy, base))
    mixed = synthetic.preference_rows(base, seed=1, rejected="mixed")
    assert [r["rejected"] == synthetic.NON_ANSWER for r in mixed[:4]] == [True, False, True, False]
    assert all(r["chosen"] != r["rejected"] for r in mixed)
    cfg = SimpleNamespace(source="synthetic:arith?noise=0.5", num_examples=100, eval_ratio=0.2)
    bundle = load_data(cfg, "sft", tokenizer=None, seed=0)
    assert sum(c == synthetic.NON_ANSWER for c in bundle.train["completion"]) == 40
    assert synthetic.NON_ANSWER not in bundle.eval["completion"], "held-out rows keep the true answers"
    for bad in ("noise=2", "rejected=wrong"):
        with pytest.raises(UserError, match="bad synthetic option"):
            load_data(SimpleNamespace(source=f"synthetic:arith?{bad}", num_examples=10, eval_ratio=0.1), "sft")


def test_synthetic_views():
    base = synthetic.make_examples("arith", 200, seed=1)
    assert synthetic.sft_rows(base)[0] == {"prompt": base[0]["prompt"], "completion": base[0]["answer"]}
    for row in synthetic.preference_rows(base, seed=1) + synthetic.preference_rows(
            synthetic.make_examples("reverse", 100, seed=1), seed=1):
        assert row["chosen"] != row["rejected"] and row["chosen"] == synthetic.solve(row["prompt"])
    for row in synthetic.preference_rows(base, seed=1):  # a plausible mistake: off by 1, 2 or 10
        assert abs(synthetic.read_number(row["rejected"]) - synthetic.read_number(row["chosen"])) in (1, 2, 10)
    assert set(synthetic.prompt_rows(base)[0]) == {"prompt", "answer"}
    cls = synthetic.classification_rows(base, seed=1, positive_fraction=0.25)
    assert sum(r["label"] for r in cls) == 50
    for row in cls:
        prompt, shown = row["text"].split("=")
        assert (synthetic.solve(prompt + "=") == shown) == bool(row["label"])


def test_arith_reward_and_exact_match():
    prompts = ["12+7="] * 5
    completions = ["91", "91</s>", " 91 and more", "02", "nineteen"]
    assert synthetic.arith_reward(prompts, completions) == [1.0, 1.0, 1.0, 0.1, 0.0]
    assert synthetic.arith_reward(prompts[:1], ["19"], order="natural") == [1.0]
    assert synthetic.arith_reward(["x"], ["5"], answer=["5"]) == [1.0]
    assert synthetic.arith_reward(["12+7="], ["910"]) == [0.1]  # not a prefix match: "910" is another number
    chat = [[{"role": "user", "content": "2+3="}]]
    assert synthetic.arith_reward(chat, [[{"role": "assistant", "content": "5"}]]) == [1.0]
    assert synthetic.exact_match(" 19\n", "19") and not synthetic.exact_match("1", "19")


# ---- tiny tokenizer / model --------------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_specials(tok):
    for text in ["12+7=19", "The quick brown fox.", "Ünïcode ✓ 日本語", "### Instruction:\nAdd\n"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.padding_side == "right"
    # digits are single tokens and the prompt tokenises to a prefix of prompt+answer (TRL's completion mask)
    assert tok("12+7=")["input_ids"] == tok("12+7=19")["input_ids"][:6]
    assert tok.convert_ids_to_tokens(tok("123")["input_ids"][1:]) == ["1", "2", "3"]


def test_tokenizer_deterministic(tok):
    from recipes.tiny import build_tokenizer

    assert build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_chat_template_assistant_masks(tok):
    # What trl 1.12's assistant_only_loss needs (trl.chat_template_utils.has_generation_markers and
    # is_chat_template_stop_token_trained, checked by hand here: importing trl costs ~10 s): `{% generation %}`
    # markers, and the assistant span ending on an added token (eos), so the model learns to stop.
    import re

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3="},
                {"role": "assistant", "content": "5"}]
    assert re.search(r"\{%-?\s*generation\s*-?%\}", tok.chat_template)
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "5</s>" and masked[-1] in tok.get_added_vocab().values()
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tokenize=False).startswith(prompt)


def test_count_tokens_matches_tokenizing_each_row(tok):
    """The batched count is what tokenizing row by row gives: +1 eos on plain text, chat through the template,
    the longer side of a preference pair."""
    from recipes.data import count_tokens

    def one(value, generation_prompt=False, eos=1):
        if isinstance(value, list):
            text = tok.apply_chat_template(value, tokenize=False, add_generation_prompt=generation_prompt)
            return len(tok(text, add_special_tokens=False)["input_ids"])
        return len(tok(value)["input_ids"]) + eos

    user = [{"role": "user", "content": "What is 12+30?"}]
    short, long = [{"role": "assistant", "content": "42"}], [{"role": "assistant", "content": "it is 42, surely"}]
    assert count_tokens({"text": ["12+30=42", "7+1=8 and more"]}, tok, "sft")["_n_tokens"] == [
        one("12+30=42"), one("7+1=8 and more")]
    assert count_tokens({"messages": [user + short, user + long]}, tok, "sft")["_n_tokens"] == [
        one(user + short), one(user + long)]
    pairs = {"prompt": ["1+1=", user], "chosen": ["2", long], "rejected": ["3 or maybe 4", short]}
    assert count_tokens(pairs, tok, "preference")["_n_tokens"] == [
        max(one("1+1=2"), one("1+1=3 or maybe 4")), max(one(user + long), one(user + short))]
    assert count_tokens({"prompt": ["1+1=", user]}, tok, "prompts")["_n_tokens"] == [
        one("1+1=", eos=0), one(user, generation_prompt=True)]


def test_tiny_model_config(tok):
    from recipes.tiny import tiny_model_config

    config = tiny_model_config(tok, hidden_size=64, num_hidden_layers=3)
    assert config.vocab_size == len(tok) and config.hidden_size == 64 and config.num_hidden_layers == 3
    assert config.pad_token_id == tok.pad_token_id and config.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError):
        tiny_model_config(tok, vocab_size=10)


def test_tokenizer_cache_dir(tmp_path, tok):
    from recipes.tiny import tiny_tokenizer

    first = tiny_tokenizer(cache_dir=str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    again = tiny_tokenizer(cache_dir=str(tmp_path))
    assert again("12+7=19")["input_ids"] == tok("12+7=19")["input_ids"] and again.chat_template == first.chat_template


# ---- synthetic through load_data -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,columns", [("sft", ["prompt", "completion"]), ("preference", ["prompt", "chosen",
                         "rejected"]), ("prompts", ["prompt", "answer"]), ("classification", ["text", "label"])])
def test_load_synthetic_each_kind(tok, kind, columns):
    bundle = load_data(cfg(num_examples=200), kind, tok, seed=1)
    assert isinstance(bundle, DataBundle) and bundle.format == "synthetic:arith"
    assert bundle.train.column_names == columns and len(bundle.train) == 180 and len(bundle.eval) == 20
    assert not set(bundle.train["prompt" if kind != "classification" else "text"]) & set(
        bundle.eval["prompt" if kind != "classification" else "text"])
    assert bundle.stats["rows_read"] == 200 and bundle.stats["train_rows"] == 180
    again = load_data(cfg(num_examples=200), kind, tok, seed=1)
    assert rows_of(again.train) == rows_of(bundle.train)


def test_synthetic_options_and_errors(tok):
    bundle = load_data(cfg(source="synthetic:arith?positive_fraction=0.2", num_examples=100), "classification")
    assert bundle.stats["label_counts"] == {0: 72, 1: 18}
    with pytest.raises(UserError, match="unknown synthetic task 'arithm'"):
        load_data(cfg(source="synthetic:arithm"), "sft")
    for option, need in (("order=backwards", "one of reversed, natural"), ("max_operand=-5", "a positive integer"),
                         ("positive_fraction=nan", "a number in \\[0, 1\\]")):  # which option, and what it takes
        with pytest.raises(UserError, match=f"bad synthetic option {option}: must be {need}"):
            load_data(cfg(source=f"synthetic:arith?{option}"), "sft")
    natural = load_data(cfg(source="synthetic:arith?order=natural&max_operand=9", num_examples=20), "sft")
    assert all(r["completion"] == str(eval(r["prompt"][:-1])) for r in natural.train.to_list())


# ---- formats -------------------------------------------------------------------------------------------------------

def test_text_format(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"sentence number {i}"} for i in range(10)])
    bundle = load_data(cfg(source=path, eval_ratio=0.2), "sft", tok)
    assert bundle.format == "text" and bundle.train.column_names == ["text"]
    assert len(bundle.train) == 8 and len(bundle.eval) == 2


def test_alpaca_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 1 and 2", "input": "", "output": "3"},
                                              {"instruction": "Sum", "input": "4, 5", "output": "9"}])
    bundle = load_data(cfg(source=path, eval_ratio=0.0), "sft")
    rows = sorted(rows_of(bundle.train), key=lambda r: r["completion"])
    assert bundle.format == "alpaca"
    assert rows[0] == {"prompt": "### Instruction:\nAdd 1 and 2\n\n### Response:\n", "completion": "3"}
    assert "### Input:\n4, 5\n\n" in rows[1]["prompt"]
    prompts = load_data(cfg(source=path, eval_ratio=0.0), "prompts")
    assert sorted(prompts.train["answer"]) == ["3", "9"]


def test_messages_and_sharegpt(tmp_path, tok):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": chat, "id": i} for i in range(4)])
    bundle = load_data(cfg(source=path, eval_ratio=0.0), "sft", tok)
    assert bundle.format == "messages" and bundle.train.column_names == ["messages"]
    assert bundle.train[0]["messages"] == chat
    prompts = load_data(cfg(source=path, eval_ratio=0.0), "prompts")
    assert prompts.train[0] == {"prompt": chat[:1], "answer": "Hello"}
    share = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                  {"from": "gpt", "value": "Hello"}]}])
    assert load_data(cfg(source=share, eval_ratio=0.0), "sft").train[0]["messages"] == chat
    # Arrow gives every message the union of keys in the file (here 'name'), absent ones as None
    extra = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "Hi", "name": "ann"},
                                                             {"role": "assistant", "content": "Hello"}]}])
    assert load_data(cfg(source=extra, eval_ratio=0.0), "sft").train[0]["messages"] == chat


def test_prompt_completion_and_conversational(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    bundle = load_data(cfg(source=path, eval_ratio=0.0), "sft")
    assert bundle.format == "prompt_completion" and rows_of(bundle.train) == [{"prompt": "2+2=", "completion": "4"}]
    conv = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "2+2="}],
                                               "completion": [{"role": "assistant", "content": "4"}]}])
    row = load_data(cfg(source=conv, eval_ratio=0.0), "sft").train[0]
    assert row["completion"] == [{"role": "assistant", "content": "4"}]


def test_preference_format(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    bundle = load_data(cfg(source=path, eval_ratio=0.0), "preference")
    assert bundle.format == "preference" and rows_of(bundle.train) == [{"prompt": "2+2=", "chosen": "4",
                                                                        "rejected": "5"}]
    assert rows_of(load_data(cfg(source=path, eval_ratio=0.0), "sft").train) == [{"prompt": "2+2=",
                                                                                  "completion": "4"}]
    implicit = write_jsonl(tmp_path / "i.jsonl", [{"chosen": "Q: a A: b", "rejected": "Q: a A: c"}])
    assert load_data(cfg(source=implicit, eval_ratio=0.0), "preference").train.column_names == ["chosen",
                                                                                                "rejected"]


def test_classification_string_labels(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": "pos" if i % 3 else "neg"}
                                              for i in range(9)])
    bundle = load_data(cfg(source=path, eval_ratio=0.0), "classification")
    assert bundle.format == "classification" and bundle.stats["label_names"] == ["neg", "pos"]
    assert bundle.stats["label_counts"] == {0: 3, 1: 6}


def test_named_format_and_prompts(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    bundle = load_data(cfg(source=path, eval_ratio=0.0, format="prompts"), "prompts")
    assert rows_of(bundle.train) == [{"prompt": "1+1=", "answer": "2"}]


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "reply": "2", "completion": "junk"}])
    bundle = load_data(cfg(source=path, eval_ratio=0.0, columns={"prompt": "question", "completion": "reply"}),
                       "sft")
    assert rows_of(bundle.train) == [{"prompt": "1+1=", "completion": "2"}]


def test_csv_json_parquet_and_directory(tmp_path):
    import pandas as pd

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.csv").write_text("prompt,completion\n1+1=,2\n2+2=,4\n", encoding="utf-8")
    (folder / "b.json").write_text(json.dumps([{"prompt": "3+3=", "completion": "6"}]), encoding="utf-8")
    pd.DataFrame([{"prompt": "4+4=", "completion": "8"}]).to_parquet(folder / "c.parquet")
    bundle = load_data(cfg(source=str(folder), eval_ratio=0.0), "sft")
    assert sorted(bundle.train["completion"]) == ["2", "4", "6", "8"]  # CSV's inferred ints come back as text
    # files of one directory in two layouts fail as two separate sources of different formats do
    (folder / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "5+5="},
                                                             {"role": "assistant", "content": "10"}]}) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl' gives columns \['messages'\].*mix only sources of the same"):
        load_data(cfg(source=str(folder), eval_ratio=0.0), "sft")


# ---- bad input: one-line UserError naming the row / field / file -------------------------------------------------

def test_missing_field_names_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2"},
                                                {"prompt": "2+2=", "completion": None}])
    with pytest.raises(UserError, match=r"bad\.jsonl row 2: missing or empty 'completion'") as info:
        load_data(cfg(source=path), "sft")
    assert "\n" not in str(info.value)


def test_empty_prompt_for_prompts_kind(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "  "}])
    with pytest.raises(UserError, match=r"row 3: missing or empty 'prompt'"):
        load_data(cfg(source=path), "prompts")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty.jsonl: the file is empty"):
        load_data(cfg(source=str(path)), "sft")


def test_non_utf8_names_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl line 2: byte 0xe9 is not valid UTF-8"):
        load_data(cfg(source=str(path)), "sft")


def test_identical_chosen_rejected(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.raises(UserError, match=r"p\.jsonl row 2: 'chosen' and 'rejected' are identical"):
        load_data(cfg(source=path), "preference")


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: file not found .data.source is resolved"):
        load_data(cfg(source=str(tmp_path / "nope.jsonl")), "sft")
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    with pytest.raises(UserError, match="held.jsonl: file not found .data.eval_source is resolved"):
        load_data(cfg(source=train, eval_source=str(tmp_path / "held.jsonl")), "sft")
    other = tmp_path / "data.txt"
    other.write_text("hello", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        load_data(cfg(source=str(other)), "sft")


def test_unknown_format_and_undetectable_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(UserError, match="data.format: unknown format 'chatml'"):
        load_data(cfg(source=path, format="chatml"), "sft")
    with pytest.raises(UserError, match=r"cannot tell the data format from columns foo, bar"):
        load_data(cfg(source=path), "sft")
    with pytest.raises(UserError, match=r"format 'alpaca' needs column\(s\) instruction, output"):
        load_data(cfg(source=path, format="alpaca"), "sft")


def test_format_wrong_for_kind(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    with pytest.raises(UserError, match="format 'text' cannot train this method"):
        load_data(cfg(source=path), "preference")


def test_bad_message_role_and_label(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "bot", "content": "yo"}]}])
    with pytest.raises(UserError, match=r"m\.jsonl row 1: 'messages'\[1\]: role 'bot'"):
        load_data(cfg(source=path), "sft")
    labels = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": -1}])
    with pytest.raises(UserError, match=r"l\.jsonl row 2: 'label' must be a class index"):
        load_data(cfg(source=labels), "classification")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.jsonl.*line 2"):
        load_data(cfg(source=str(path)), "sft")


def test_mapped_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1="}])
    with pytest.raises(UserError, match="data.columns maps 'completion' to column 'reply'"):
        load_data(cfg(source=path, columns={"prompt": "question", "completion": "reply"}), "sft")


def test_hub_offline_is_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="could not be loaded offline.*pass a local"):
        load_data(cfg(source="org/name"), "sft")


def test_bad_weights():
    with pytest.raises(UserError, match="one weight per source"):
        load_data(cfg(source=["synthetic:arith", "synthetic:reverse"], weights=[1.0]), "sft")


# ---- lengths, splits, mixing -------------------------------------------------------------------------------------

def test_truncate_and_drop_counting(tmp_path, tok):
    rows = [{"text": "short"}] * 6 + [{"text": "word " * 60}] * 4
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    kept = load_data(cfg(source=path, max_length=16, too_long="truncate", eval_ratio=0.0), "sft", tok)
    assert len(kept.train) == 10 and kept.stats["truncated"] == 4 and kept.stats["dropped"] == {}
    dropped = load_data(cfg(source=path, max_length=16, too_long="drop", eval_ratio=0.0), "sft", tok)
    assert len(dropped.train) == 6 and dropped.stats["dropped"] == {"too_long": 4}
    only_long = write_jsonl(tmp_path / "only.jsonl", [{"text": "word " * 60}] * 2)
    with pytest.raises(UserError, match="no rows left after dropping over-long ones"):
        load_data(cfg(source=only_long, max_length=16, too_long="drop"), "sft", tok)


def test_stratified_split_keeps_label_ratio(tmp_path):
    rng = random.Random(0)
    rows = [{"text": f"r{i}", "label": int(i < 40)} for i in range(200)]  # 20 % positive
    rng.shuffle(rows)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    bundle = load_data(cfg(source=path, eval_ratio=0.25), "classification", seed=5)
    assert len(bundle.eval) == 50 and sum(bundle.eval["label"]) == 10 and sum(bundle.train["label"]) == 30
    assert bundle.train.features["label"].dtype == "int64"


def test_stratified_split_with_fewer_eval_rows_than_labels(tmp_path):
    """10 rows of 3 labels, 2 held out: no stratified split can hold every label; a plain seeded one is made."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(10)])
    bundle = load_data(cfg(source=path, eval_ratio=0.2), "classification", seed=0)
    assert (len(bundle.train), len(bundle.eval)) == (8, 2)


def test_corrupt_csv_is_one_line_with_the_cause(tmp_path, capfd):
    """The parser's own reason in our line, and datasets' logger quiet (it would print the error first)."""
    import datasets

    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n1+1=,2,extra,cols\n"unterminated\n', encoding="utf-8")
    datasets.logging.set_verbosity_warning()  # as the command line has it
    with pytest.raises(UserError, match=r"d.csv: could not be read as .csv \(Error tokenizing data"):
        load_data(cfg(source=str(path)), "sft")
    assert "Failed to read file" not in capfd.readouterr().err
    assert datasets.logging.get_verbosity() == datasets.logging.WARNING  # restored


def test_eval_source_overrides_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}+0=", "completion": str(i)} for i in range(10)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "9+9=", "completion": "18"}])
    bundle = load_data(cfg(source=train, eval_source=held, eval_ratio=0.5), "sft")
    assert len(bundle.train) == 10 and rows_of(bundle.eval) == [{"prompt": "9+9=", "completion": "18"}]


def test_mixing_with_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(20)])
    bundle = load_data(cfg(source=[a, b], weights=[0.5, 0.5], eval_ratio=0.0), "sft")
    texts = bundle.train["text"]
    assert len(texts) == 120 and sum(t.startswith("b") for t in texts) == 60  # b oversampled to its share
    with pytest.raises(UserError, match="mix only sources of the same format"):
        load_data(cfg(source=[a, "synthetic:arith"], eval_ratio=0.0), "sft")


def test_file_dataset_is_cached(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(50)])
    first = load_data(cfg(source=path, eval_ratio=0.0), "sft", tok)
    again = load_data(cfg(source=path, eval_ratio=0.0), "sft", tok)
    assert first.train.cache_files and first.train._fingerprint == again.train._fingerprint


# ---- padding helpers ---------------------------------------------------------------------------------------------

def test_padding_fraction():
    assert padding_fraction([4, 2, 4, 4], batch_size=2, packed=False, max_length=8) == pytest.approx(2 / 16)
    assert sorted(map(sorted, bfd_pack([5, 3, 4, 4], 8))) == [[3, 5], [4, 4]]
    assert padding_fraction([5, 3, 4, 4], batch_size=2, packed=True, max_length=8) == 0.0
    rng = random.Random(0)
    skewed = [rng.choice([8, 12, 16]) if rng.random() < 0.8 else rng.randint(100, 250) for _ in range(500)]
    unpacked = padding_fraction(skewed, 8, packed=False, max_length=256)
    packed = padding_fraction(skewed, 8, packed=True, max_length=256)
    assert unpacked > 0.3 and packed < 0.05
    assert padding_fraction(skewed, 8, packed=True, max_length=256, padding_free=True) == 0.0


def test_token_counts_travel_with_their_rows(tmp_path, tok):
    """load_data hands back each training row's token count in the dataset's final order (dropping, splitting and
    mixing reorder rows); neither split keeps the helper column, so the trainers never see it."""
    rng = random.Random(0)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x " * rng.randint(1, 40)} for _ in range(60)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "y " * rng.randint(1, 40)} for _ in range(30)])
    bundle = load_data(cfg(source=[a, b], weights=[0.5, 0.5], max_length=32, too_long="drop", eval_ratio=0.2),
                       "sft", tok)
    assert LENGTH_COLUMN not in bundle.train.column_names and LENGTH_COLUMN not in bundle.eval.column_names
    recounted = count_tokens(bundle.train.to_dict(), tok, "sft")[LENGTH_COLUMN]
    assert bundle.train_lengths == recounted and max(recounted) <= 32 and len(set(recounted)) > 5
    assert load_data(cfg(source=a, eval_ratio=0.0), "sft").train_lengths is None  # no tokenizer: nothing counted


def test_padding_share_of_shuffled_micro_batches():
    rng = random.Random(0)
    skewed = [rng.choice([8, 12, 16]) if rng.random() < 0.8 else rng.randint(100, 250) for _ in range(500)]
    share = padding_share(skewed, 8, max_length=256, seed=0)
    assert 0.3 < share < 1 and share == padding_share(skewed, 8, max_length=256, seed=0)
    assert padding_share(skewed, 1, max_length=256, seed=0) == 0.0  # a row alone is never padded
    assert padding_share([12] * 100, 8, max_length=256, seed=0) == 0.0
    assert padding_share(skewed, 8, max_length=16, seed=0) < share  # rows cut at max_length pad less
