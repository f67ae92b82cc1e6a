"""The tiny model as built for the tests and the demo: a real model with a chat template,
whose completions are words, whose plain completions run on, and whose replies end."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from completion_queue import ConfigError
from engine.tiny import (
    BUILD_VERSION,
    EOS_TOKEN,
    IM_END,
    MARKER_FILE,
    _move_into_place,
    corpus_words,
    ensure_tiny_model,
    is_current,
)

PROMPTS = ["The weather today", "Once upon a time", "The queue takes a job and", "In 1969 people"]
QUESTIONS = [
    "The weather today",
    "Tell me about exceptions",
    "What is a class?",
    "Once upon a time",
]


class Loaded:
    """The tiny model and its tokenizer, loaded as any model is."""

    def __init__(self, path: Path) -> None:
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModelForCausalLM.from_pretrained(path).eval()

    def greedy(self, text: str, max_new_tokens: int) -> list[int]:
        """Return the new tokens of a greedy ``generate`` on ``text``, with its own EOS list."""
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids])
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        return list(out[0, ids.shape[1] :].tolist())


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> Loaded:
    return Loaded(tiny_model)


def words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z]+", text)]


def test_it_loads_as_any_model_with_a_chat_template_and_two_eos(loaded: Loaded) -> None:
    tokenizer = loaded.tokenizer
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is a queue?"},
    ]
    # When a conversation is rendered with the model's own template
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Then it is ChatML, ending in the assistant's header
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is a queue?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # and the markers are single special tokens, dropped from decoded text
    ids = tokenizer(text, add_special_tokens=False).input_ids
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert ids.count(end_id) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("system\nAnswer briefly.")
    # and a reply ends at either EOS, while the model's own EOS and padding stay <|endoftext|>
    assert set(loaded.model.generation_config.eos_token_id) == {eos_id, end_id}
    assert loaded.model.config.eos_token_id == eos_id == tokenizer.eos_token_id
    assert loaded.model.generation_config.pad_token_id == eos_id


def test_the_generation_config_on_disk_lists_both_eos(tiny_model: Path) -> None:
    config = GenerationConfig.from_pretrained(tiny_model)
    assert len(config.eos_token_id) == 2
    assert json.loads((tiny_model / MARKER_FILE).read_text())["version"] == BUILD_VERSION


def test_greedy_completions_are_words_of_its_corpus_and_run_to_their_budget(
    loaded: Loaded,
) -> None:
    known = corpus_words()
    # When four English prompts are completed greedily, 32 new tokens each
    outputs = [loaded.greedy(prompt, 32) for prompt in PROMPTS]
    texts = [loaded.tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
    found = [w for text in texts for w in words(text)]
    # Then no plain completion ends early: only chat replies learnt to stop
    assert [len(out) for out in outputs] == [32] * 4, texts
    # and most of their words are words of the text the model was trained on
    assert len(found) >= 40, texts
    assert sum(w in known for w in found) >= 0.7 * len(found), texts
    # and they are not one word over and over
    assert len(set(found)) >= 8, texts


def test_a_chat_reply_ends_with_im_end_within_its_budget(loaded: Loaded) -> None:
    tokenizer = loaded.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    replies = []
    for question in QUESTIONS:
        # When a user's message is answered greedily, in at most 48 tokens
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        replies.append(loaded.greedy(prompt, 48))
    # Then some reply ends with <|im_end|> before its budget, after words
    ended = [r for r in replies if r and r[-1] == end_id and len(r) < 48]
    assert ended, [tokenizer.decode(r) for r in replies]
    assert all(words(tokenizer.decode(r, skip_special_tokens=True)) for r in ended)


def test_a_current_model_dir_is_kept(tiny_model: Path) -> None:
    before = {f.name: f.stat().st_mtime_ns for f in tiny_model.iterdir()}
    assert is_current(tiny_model)
    assert ensure_tiny_model(tiny_model) == tiny_model
    assert {f.name: f.stat().st_mtime_ns for f in tiny_model.iterdir()} == before


def test_an_older_build_is_replaced_but_a_foreign_dir_is_not(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Given a model dir from an older build: the files, no marker (the random-weights model)
    old = tmp_path / "tiny-gpt2"
    shutil.copytree(tiny_model, old)
    (old / MARKER_FILE).unlink()
    (old / "chat_template.jinja").unlink()
    assert not is_current(old)
    # When a new build is moved into its place
    staging = tmp_path / ".tiny-new"
    shutil.copytree(tiny_model, staging)
    _move_into_place(staging, old)
    # Then the dir holds the new build, and nothing is left beside it
    assert is_current(old)
    assert (old / "chat_template.jinja").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-gpt2"]
    # Given a dir of the same name that holds someone's own files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    staging = tmp_path / ".tiny-newer"
    shutil.copytree(tiny_model, staging)
    # Then it is refused, and the dir is left as it was
    with pytest.raises(ConfigError, match="files other than a tiny model's"):
        _move_into_place(staging, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not staging.exists()
