"""A shape's vocabulary padding, and the shapes `make_shaped_model` knows (no model is built)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from completion_queue import ConfigError
from engine.shapes import SHAPES, make_shaped_model, pad_vocabulary

TEXT = "the queue takes a job, the worker takes a batch, and the database keeps the result"


def small_tokenizer(path: Path) -> Path:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 4, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save(str(path))
    return path


def test_padding_keeps_every_encoding_and_spells_each_new_id(tmp_path: Path) -> None:
    # Given a byte-level BPE tokenizer file smaller than a model's vocabulary
    file = small_tokenizer(tmp_path / "tokenizer.json")
    before = PreTrainedTokenizerFast(tokenizer_file=str(file))
    # When it is padded to 1,000 ids
    pad_vocabulary(file, 1000)
    after = PreTrainedTokenizerFast(tokenizer_file=str(file))
    # Then text (even a pad token's spelling) encodes as before, and every id decodes
    assert len(before) < 1000 and len(after) == 1000
    for text in (TEXT, "<|pad_999|> and more", "<|endoftext|>"):
        assert after(text).input_ids == before(text).input_ids
    assert after.decode([len(before), 999]) == f"<|pad_{len(before)}|><|pad_999|>"
    assert after.decode(before(TEXT).input_ids) == TEXT


def test_padding_refuses_a_tokenizer_larger_than_the_model(tmp_path: Path) -> None:
    file = small_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="more than the model's 10"):
        pad_vocabulary(file, 10)


def test_an_unknown_shape_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiny, gpt2-small, got 'gpt2-xl'"):
        make_shaped_model(tmp_path / "m", shape="gpt2-xl")
    assert SHAPES == ("tiny", "gpt2-small")
    assert not (tmp_path / "m").exists()


def test_a_random_shape_refuses_a_directory_with_files(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        make_shaped_model(tmp_path / "m", shape="gpt2-small")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["notes.txt"]
