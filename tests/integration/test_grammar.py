"""Structured output: ``response_format`` grammars as a per-row logits processor, on the
real tiny model and transformers' real batched ``generate``, sampled per row as the
worker samples (``ConstrainedRows`` then ``RowSampler``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList

from completion_queue import UnsupportedResponseFormat
from engine import GenerationRequest
from engine.grammar import ConstrainedRows, Grammars
from engine.sampling import RowSampler
from tests.schemas import PERSON, PERSON_FORMAT

SCHEMA_FORMAT = json.dumps(PERSON_FORMAT, sort_keys=True)
OBJECT_FORMAT = json.dumps({"type": "json_object"})
# 24 rows, each with its own seed: 14 schema rows, 6 json_object rows, 4 unconstrained.
FORMATS: list[str | None] = [SCHEMA_FORMAT] * 14 + [OBJECT_FORMAT] * 6 + [None] * 4
SEEDS = list(range(len(FORMATS)))
MAX_NEW_TOKENS = 96
PROMPT = "Question: what is the capital of France? Answer:"


@dataclass
class Tiny:
    """The tiny model, its tokenizer, its stop tokens and a compiler of its grammars."""

    model: Any
    tokenizer: Any
    stop_ids: list[int]
    grammars: Grammars


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Iterator[Tiny]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other suites: one thread is quicker
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    eos = model.generation_config.eos_token_id
    stop_ids = list(eos) if isinstance(eos, list) else [eos]
    vocab = model.config.vocab_size
    yield Tiny(model, tokenizer, stop_ids, Grammars(tokenizer, vocab_size=vocab, stop_ids=stop_ids))
    torch.set_num_threads(threads)


def generate(
    tiny: Tiny, formats: Sequence[str | None], *, constrained: bool
) -> tuple[list[list[int]], ConstrainedRows | None]:
    """One batched sampled ``generate`` (temperature 1, a seed per row); each row's new tokens."""
    prompt = tiny.tokenizer.encode(PROMPT)
    rows = [
        GenerationRequest(
            key=str(i), prompt_ids=tuple(prompt), max_new_tokens=MAX_NEW_TOKENS, seed=seed
        )
        for i, seed in enumerate(SEEDS[: len(formats)])
    ]
    cpu = torch.device("cpu")
    processors = LogitsProcessorList()
    grammar = ConstrainedRows(tiny.grammars, formats, cpu) if constrained else None
    if grammar is not None:
        processors.append(grammar)
    generators = [torch.Generator().manual_seed(r.seed or 0) for r in rows]
    processors.append(RowSampler(rows, generators, torch.zeros(len(rows), dtype=torch.long), cpu))
    config = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        pad_token_id=tiny.stop_ids[0],
        eos_token_id=tiny.stop_ids,
    )
    input_ids = torch.tensor([prompt] * len(rows))
    with torch.inference_mode():
        output = tiny.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            logits_processor=processors,
        )
    return output[:, len(prompt) :].tolist(), grammar


def cut_at_stop(tokens: list[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i], True
    return tokens, False


def completes_to_json(text: str) -> bool:
    """True when ``text`` is a prefix of some JSON document (tried by closing it)."""
    closers, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]":
            closers.pop()
    ends = ['"', 'n"', '0"', '00"', '000"', '0000"'] if in_string else ["", "0", "e", "ue", "rue"]
    ends += ["alse", "lse", "se", "ull", "ll", "l", "1", '"a": 0', "0]"] if not in_string else []
    tail = "".join(reversed(closers))
    for end in ends:
        for middle in ("", ": 0"):
            try:
                json.loads(text + end + middle + tail)
            except ValueError:
                continue
            return True
    return False


@pytest.fixture(scope="module")
def batches(tiny: Tiny) -> tuple[list[list[int]], list[list[int]], ConstrainedRows]:
    """The same 24 rows, seeds and prompt, generated with and without the grammar processor."""
    with_grammar, grammar = generate(tiny, FORMATS, constrained=True)
    without, _ = generate(tiny, FORMATS, constrained=False)
    assert grammar is not None
    return with_grammar, without, grammar


def test_schema_rows_sampled_at_temperature_one_always_validate_and_end_with_a_stop_token(
    tiny: Tiny, batches: tuple[list[list[int]], list[list[int]], ConstrainedRows]
) -> None:
    # Given 14 rows constrained by a schema (bounded string, integer, enum, boolean, all
    # required) sharing one batch with json_object and unconstrained rows, 14 seeds
    with_grammar, _, grammar = batches

    # Then every schema row ended with a stop token, and its text parses and validates
    for row, fmt in enumerate(FORMATS):
        if fmt != SCHEMA_FORMAT:
            continue
        tokens, stopped = cut_at_stop(with_grammar[row], tiny.stop_ids)
        assert stopped, f"row {row} ran out of tokens: {tiny.tokenizer.decode(tokens)!r}"
        document = json.loads(tiny.tokenizer.decode(tokens, skip_special_tokens=True))
        jsonschema.validate(document, PERSON)
    assert grammar.failed_rows == {}
    assert {r for r, f in enumerate(FORMATS) if f == SCHEMA_FORMAT} <= grammar.finished_rows


def test_json_object_rows_are_objects_when_they_end_and_json_prefixes_when_cut(
    tiny: Tiny, batches: tuple[list[list[int]], list[list[int]], ConstrainedRows]
) -> None:
    # Given 6 json_object rows of the same batch: the tiny model writes prose inside its
    # first key and rarely closes it, so most reach their budget
    with_grammar, _, grammar = batches

    for row, fmt in enumerate(FORMATS):
        if fmt != OBJECT_FORMAT:
            continue
        tokens, stopped = cut_at_stop(with_grammar[row], tiny.stop_ids)
        text = tiny.tokenizer.decode(tokens, skip_special_tokens=True)
        # Then an ended row is one JSON object; a cut one is the start of a JSON object
        if stopped:
            assert isinstance(json.loads(text), dict)
        else:
            assert len(tokens) == MAX_NEW_TOKENS
            assert text.startswith("{") and completes_to_json(text), text
        assert row not in grammar.failed_rows


def test_unconstrained_rows_are_the_same_with_or_without_constrained_batch_mates(
    batches: tuple[list[list[int]], list[list[int]], ConstrainedRows],
) -> None:
    # Given the same batch generated with and without the grammar processor
    with_grammar, without, _ = batches

    # Then the unconstrained rows produced exactly the same tokens: nothing leaks across
    for row, fmt in enumerate(FORMATS):
        if fmt is None:
            assert with_grammar[row] == without[row], row
    # and the constrained rows did change (the processor did act on them)
    assert with_grammar[0] != without[0]


def test_a_finished_document_allows_only_the_stop_tokens(tiny: Tiny) -> None:
    # Given logits wider than the tokenizer (padding ids) and a valid document's tokens
    width = len(tiny.tokenizer) + 40
    grammars = Grammars(tiny.tokenizer, vocab_size=width, stop_ids=tiny.stop_ids)
    grammar = ConstrainedRows(grammars, [SCHEMA_FORMAT, None], torch.device("cpu"))
    # (properties come in the schema's order: sorted, as the canonical text sorts keys)
    document = '{"active": true, "age": 36, "name": "Ada", "role": "admin"}'
    tokens = tiny.tokenizer.encode(document)
    ids = torch.zeros((2, 1), dtype=torch.long)
    scores = torch.randn(2, width)

    # When the processor is called before each token, the chosen token appended after
    for token in tokens:
        masked = grammar(ids, scores)
        # Then each token of the document was allowed, and the free row is untouched
        assert masked[0, token] > float("-inf")
        assert torch.equal(masked[1], scores[1])
        ids = torch.cat([ids, torch.tensor([[token], [5]])], dim=1)
    masked = grammar(ids, scores)
    allowed = masked[0].isfinite().nonzero().view(-1).tolist()
    assert allowed == sorted(tiny.stop_ids)
    assert masked[0, len(tiny.tokenizer) :].isinf().all()

    # When the row chooses a stop token, it is ended: its padding is not matched
    ids = torch.cat([ids, torch.tensor([[tiny.stop_ids[-1]], [5]])], dim=1)
    assert torch.equal(grammar(ids, scores), scores)
    assert grammar.finished_rows == {0} and grammar.failed_rows == {}


def test_a_rejected_token_fails_that_row_alone(tiny: Tiny) -> None:
    # Given two rows with a grammar, one of which is handed a token the grammar forbids
    # (as if a later processor had overridden the mask)
    grammar = ConstrainedRows(tiny.grammars, [OBJECT_FORMAT, SCHEMA_FORMAT], torch.device("cpu"))
    scores = torch.randn(2, tiny.model.config.vocab_size)
    grammar(torch.zeros((2, 1), dtype=torch.long), scores)
    bad, good = tiny.tokenizer.encode("x")[0], tiny.tokenizer.encode("{")[0]

    # When the next step runs
    masked = grammar(torch.tensor([[0, bad], [0, good]]), scores)

    # Then that row is marked failed with the matcher's reason and left unmasked,
    # while the other row goes on under its grammar
    assert list(grammar.failed_rows) == [0]
    assert "x" in grammar.failed_rows[0]
    assert torch.equal(masked[0], scores[0])
    assert masked[1, tiny.tokenizer.encode('"')[0]] > float("-inf")
    assert masked[1, bad] == float("-inf")


@pytest.mark.parametrize(
    ("response_format", "named"),
    [
        ("not json", "not valid JSON"),
        ('{"type": "xml"}', "json_object or json_schema, got 'xml'"),
        ('{"type": "json_schema"}', "json_schema must be an object"),
        ('{"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}', "got list"),
        ('{"type": "json_schema", "json_schema": {"name": "a", "schema": false}}', "false"),
        # The shape rules the producer applies at submit, from the same model
        ('{"type": "json_object", "schema": {}}', "schema is not a known parameter"),
        ('{"type": "json_schema", "json_schema": {"name": "a b"}}', "json_schema.name must be"),
        (
            '{"type": "json_schema", "json_schema": {"name": "a", "schema": '
            '{"type": "array", "uniqueItems": true}}}',
            "uniqueItems",
        ),
        (
            '{"type": "json_schema", "json_schema": {"name": "a", "schema": '
            '{"not": {"type": "string"}}}}',
            '"not"',
        ),
        ('{"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "wat"}}}', "wat"),
        (
            '{"type": "json_schema", "json_schema": {"name": "a", "schema": '
            '{"$ref": "#/$defs/missing"}}}',
            "missing",
        ),
    ],
)
def test_unsupported_or_malformed_formats_are_refused_by_name(
    tiny: Tiny, response_format: str, named: str
) -> None:
    # When a malformed format, or a schema the grammar cannot enforce, is compiled
    with pytest.raises(UnsupportedResponseFormat) as refused:
        tiny.grammars.compile(response_format)

    # Then the error names what is wrong, and the processor refuses it the same way
    assert named in str(refused.value)
    with pytest.raises(UnsupportedResponseFormat):
        ConstrainedRows(tiny.grammars, [None, response_format], torch.device("cpu"))


def test_compiled_formats_are_cached_and_text_needs_no_grammar(tiny: Tiny) -> None:
    assert tiny.grammars.compile(SCHEMA_FORMAT) is tiny.grammars.compile(SCHEMA_FORMAT)
    assert tiny.grammars.compile('{"type": "text"}') is None
