"""A tiny Llama-style model and its tokenizer, built locally: no hub, no downloads, deterministic.

The tokenizer is a small byte-level BPE trained in milliseconds on the synthetic tasks' alphabet plus a few dozen
English sentences, so arithmetic, plain text, alpaca and chat data all tokenise (any byte is representable, so
nothing is ever unknown). Digits are split one per token: the model then sees place values and can learn carries,
and a prompt like "12+7=" tokenises to a prefix of "12+7=19" (TRL's prompt/completion masking relies on that).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from launcher.shapes import TINY_DEFAULTS, TINY_VOCAB_SIZE as VOCAB_SIZE

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]

# Zephyr-style turns that end with eos, so a chat-trained model stops the same way a plain-text one does.
# `{% generation %}` marks the assistant's tokens (content *and* its closing eos) for TRL's assistant_only_loss:
# trl 1.12 needs the markers, and checks that the turn's last masked token is an added token (eos is).
# No tool support on purpose: TRL then skips its prefix-preservation probe, which renders tool messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_ENGLISH = """The quick brown fox jumps over the lazy dog.
A model learns from examples, one batch at a time.
Please write a short answer to the question below.
What is the capital of France? The capital of France is Paris.
Summarize the following paragraph in one sentence.
Translate the sentence into French: the cat is on the table.
The weather today is sunny with a light breeze from the west.
Explain why the sky is blue in simple words for a child.
Training a language model needs data, compute and patience.
The assistant answered the user politely and kept the reply brief.
You are a helpful assistant. Answer the question honestly.
Instruction: add the two numbers and give only the result.
Input: the list of items is apples, bananas and cherries.
Response: here is the answer you asked for.
She reads a book every evening before going to sleep.
They walked to the station, but the train had already left.
This is a positive review: I loved the film and would watch it again.
This is a negative review: the food was cold and the service was slow.
Is this statement true or false? Water boils at one hundred degrees.
Write a poem about the sea, the wind and the light of the moon.
Hello! How are you today? I am fine, thank you for asking.
The function returns a list of numbers sorted in increasing order.
Good data matters more than a large model for most small tasks.
### Instruction:
### Input:
### Response:
"""


def _training_corpus() -> list[str]:
    from recipes.synthetic import make_examples  # local import: keeps `import recipes.tiny` cheap

    lines = [line for line in _ENGLISH.splitlines() if line]
    for row in make_examples("arith", 200, seed=0):
        lines.append(row["prompt"] + row["answer"])
    return lines * 3  # repetition lets min_frequency=2 keep the English merges


def build_tokenizer():
    """Train the byte-level BPE and wrap it; pure function of the code above, so always the same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")] + ROLE_TOKENS
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: nothing is unknown
    )
    core.train_from_iterator(_training_corpus(), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # Llama convention: bos is prepended on tokenisation; eos is not (TRL appends it to completions itself).
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, core.token_to_id(bos))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, **SPECIAL_TOKENS, additional_special_tokens=ROLE_TOKENS,
        padding_side="right", model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_tokenizer(cache_dir: Optional[str] = None, padding_side: str = "right"):
    """The tiny tokenizer. Training takes well under a second, so `cache_dir` is only a convenience: when given,
    the tokenizer is saved there once (HF layout) and loaded from there afterwards."""
    from transformers import PreTrainedTokenizerFast

    if cache_dir and (Path(cache_dir) / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cache_dir)
    else:
        tokenizer = build_tokenizer()
        if cache_dir:
            tokenizer.save_pretrained(cache_dir)
    tokenizer.padding_side = padding_side
    return tokenizer


def tiny_model_config(tokenizer, **overrides):
    """LlamaConfig for the tiny model; `overrides` use HF config key names (hidden_size=64, ...)."""
    from transformers import LlamaConfig

    values = dict(TINY_DEFAULTS)
    values.update(overrides)
    values.setdefault("vocab_size", len(tokenizer))
    if values["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {values['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return LlamaConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **values,
    )


def tiny_model(tokenizer, seed: int = 0, **overrides):
    """A freshly initialised LlamaForCausalLM (random weights, seeded) for the tiny config."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_model_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
