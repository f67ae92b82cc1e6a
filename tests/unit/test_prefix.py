"""When a group's shared prompt prefix is computed once, and how its rows are laid out."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.prefix import (
    common_prefix_len,
    pad_rows,
    shared_prefix_attention,
    shared_prefix_len,
    sharing,
)

PAD = 0


def test_the_common_prefix_stops_at_the_first_difference() -> None:
    assert common_prefix_len([(1, 2, 3, 4), (1, 2, 9), (1, 2, 3)]) == 2
    assert common_prefix_len([(1, 2), (1, 2, 3)]) == 2
    assert common_prefix_len([(5,), (6,)]) == 0
    assert common_prefix_len([]) == 0


def test_a_prefix_pays_only_when_long_enough_and_shared_by_two_rows() -> None:
    prefix = tuple(range(1, 65))
    # Given two rows sharing 64 tokens, each with a question after them
    assert shared_prefix_len([(*prefix, 7), (*prefix, 8, 9)], 64) == 64
    # When the setting is off, the prefix is one token short, or the row is alone
    assert shared_prefix_len([(*prefix, 7), (*prefix, 8, 9)], 0) == 0
    assert shared_prefix_len([(*prefix[:63], 7), (*prefix[:63], 8)], 64) == 0
    assert shared_prefix_len([(*prefix, 7)], 64) == 0


def test_a_row_equal_to_the_prefix_keeps_its_last_token_out_of_it() -> None:
    # Given one job's n choices: every row is the whole prompt
    prompt = tuple(range(1, 71))
    # Then the prefix leaves one token, from which the first new token is predicted
    assert shared_prefix_len([prompt, prompt, prompt], 64) == 69


def test_without_a_prefix_rows_are_left_padded() -> None:
    ids, mask, starts = pad_rows([(5, 6, 7), (8,)], PAD)
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert starts.tolist() == [0, 2]


def test_with_a_prefix_the_gap_follows_it_and_holds_its_last_token() -> None:
    ids, mask, starts = pad_rows([(1, 2, 3, 4, 5), (1, 2, 3, 9)], PAD, prefix_len=3)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 3, 9]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert starts.tolist() == [0, 0]


prompts = st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=12).map(tuple), min_size=1, max_size=6
)


@given(
    head=st.lists(st.integers(1, 4), max_size=12).map(tuple),
    tails=prompts,
    min_tokens=st.integers(0, 8),
)
def test_the_rows_read_back_as_their_prompts_and_the_prefix_is_theirs(
    head: tuple[int, ...], tails: list[tuple[int, ...]], min_tokens: int
) -> None:
    rows = [head + tail for tail in tails]
    shared = shared_prefix_len(rows, min_tokens)
    if shared:
        assert shared >= min_tokens > 0 and len(rows) >= 2
        assert all(row[:shared] == rows[0][:shared] and len(row) > shared for row in rows)
    ids, mask, starts = pad_rows(rows, PAD, shared)
    for i, row in enumerate(rows):
        # What the mask lets the model see is exactly the prompt, in order
        assert tuple(ids[i][mask[i] == 1].tolist()) == row
        # And every id from the row's start on is either its text or a token of its text
        assert set(ids[i, int(starts[i]) :].tolist()) <= set(row)


class _Attention(torch.nn.Module):
    """Stands in for a model's attention module: the function reads only what it is handed."""

    num_key_value_groups = 1


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("boolean", [True, False])
def test_reading_the_prefix_once_gives_sdpa_s_attention(group: int, boolean: bool) -> None:
    torch.manual_seed(0)
    rows, kv_heads, dim, prefix, length = 4, 2, 16, 24, 40
    heads = kv_heads * group
    # Given a decoding query per row, and a cache whose first 24 places are one prefix in every row
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    key[:, :, :prefix], value[:, :, :prefix] = key[:1, :, :prefix], value[:1, :, :prefix]
    # And a mask that lets each row see the prefix and part of what follows (a gap, an end)
    allowed = torch.zeros(rows, 1, 1, length, dtype=torch.bool)
    allowed[..., :prefix] = True
    for row, (start, end) in enumerate([(24, 30), (27, 30), (25, 40), (24, 25)]):
        allowed[row, ..., start:end] = True
    mask = allowed if boolean else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    module = _Attention()
    module.num_key_value_groups = group
    # When attention runs with the prefix shared, and as plain SDPA over the whole cache
    with sharing(prefix) as state:
        shared, _ = shared_prefix_attention(module, query, key, value, mask, scaling=0.25)
    assert state is not None and list(state.layers) == [id(module)]  # it read the prefix once
    plain, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    # Then both give the same output, in SDPA's (rows, 1, heads, dim) layout
    assert shared.shape == plain.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)


def test_a_mask_that_hides_part_of_the_prefix_falls_back_to_sdpa() -> None:
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    key[1, :, :6], value[1, :, :6] = key[0, :, :6], value[0, :, :6]
    # Given a mask where row 1 does not see the first prefix place (a sliding window)
    allowed = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    allowed[1, ..., 0] = False
    # When attention runs with 6 places shared
    with sharing(6) as state:
        shared, _ = shared_prefix_attention(_Attention(), query, key, value, allowed)
    assert state is not None and not state.layers
    # Then it is SDPA's result, the hidden place left out
    plain, _ = sdpa_attention_forward(_Attention(), query, key, value, allowed)
    torch.testing.assert_close(shared, plain, rtol=0, atol=0)
