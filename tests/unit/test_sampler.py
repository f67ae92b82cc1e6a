"""The per-row sampler's arithmetic: which tokens top-k and top-p keep, and how often each is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from engine import GenerationRequest
from engine.sampling import RowSampler, ascending

CPU = torch.device("cpu")


def sampler(params: Sequence[dict[str, Any]], seed: int = 0) -> RowSampler:
    rows = [
        GenerationRequest(key=str(i), prompt_ids=(1,), max_new_tokens=1, **p)
        for i, p in enumerate(params)
    ]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(rows))]
    return RowSampler(rows, generators, torch.zeros(len(rows), dtype=torch.long), CPU)


def reference_kept(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The tokens a row keeps, by the definition: sort everything, cut at k, then at p."""
    return set(reference_masses(logits, top_k, top_p))


def reference_masses(logits: torch.Tensor, top_k: int, top_p: float) -> dict[int, float]:
    """Each kept token, with the probability mass ranked above it (float64 throughout)."""
    order = logits.argsort(descending=True).tolist()
    if top_k:
        order = order[:top_k]
    probs = logits.double()[order].softmax(dim=-1).tolist()
    kept, mass = {}, 0.0
    for token, prob in zip(order, probs, strict=True):
        if (top_p < 1 and mass > top_p) or prob == 0:
            break
        kept[token] = mass
        mass += prob
    return kept


def mass_above(logits: torch.Tensor, token: int, top_k: int) -> float:
    """The probability mass ranked above ``token`` among the top ``top_k`` (float64)."""
    masses = reference_masses(logits, top_k, 1.0)
    return masses[token]


CUTS = [
    {"top_k": 1},
    {"top_k": 20},
    {"top_k": 5000},  # more than the vocabulary: no cut
    {"top_p": 0.9},
    {"top_p": 0.999},
    {"top_p": 1e-6},  # the first token only
    {"top_k": 100, "top_p": 0.5},
    {"top_k": 40, "top_p": 0.95, "temperature": 0.7},
]


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0], ids=["flat", "normal", "peaked"])
def test_top_k_and_top_p_keep_what_a_full_sort_keeps(scale: float) -> None:
    # Given rows of random logits (no ties), each with its own cut
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(len(CUTS), 3000, generator=generator) * scale
    rows = sampler(CUTS)
    # When the sampler finds each row's floor
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / rows.temperature[:, None]
    floors = rows._floors(shifted)
    for row, cut in enumerate(CUTS):
        kept = set((shifted[row] >= floors[row]).nonzero().squeeze(1).tolist())
        # Then it keeps exactly the tokens the definition keeps, but for a token whose mass
        # above it is top_p to float32's precision (its cumulative sum), kept or not
        top_k, top_p = cut.get("top_k", 0), cut.get("top_p", 1.0)
        differ = kept ^ reference_kept(shifted[row], top_k, top_p)
        assert all(abs(mass_above(shifted[row], t, top_k) - top_p) < 1e-5 for t in differ), differ
        assert len(differ) <= 1


@pytest.mark.parametrize("params", [{}, {"temperature": 0.5}, {"top_k": 3}, {"top_p": 0.7}])
def test_draws_follow_the_kept_tokens_probabilities(params: dict[str, Any]) -> None:
    # Given a row with 8 tokens of known probabilities, the last one impossible
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -torch.inf]])
    temperature = params.get("temperature", 1.0)
    kept = reference_kept(logits[0] / temperature, params.get("top_k", 0), params.get("top_p", 1))
    expected = torch.zeros(8)
    expected[list(kept)] = (logits[0, list(kept)] / temperature).softmax(dim=-1)
    rows = sampler([params] * 20_000, seed=11)
    # When it is drawn 20,000 times (20,000 rows, each with its own generator)
    tokens = rows._sample(logits.expand(20_000, -1).clone())
    # Then each token comes up as often as its probability says, and cut ones never
    share = torch.bincount(tokens, minlength=8).float() / 20_000
    assert set(tokens.unique().tolist()) == kept
    assert (share - expected).abs().max() < 0.015


@pytest.mark.parametrize(("uniform", "expected"), [(0.0, [1, 1, 1]), (1.0, [2, 2, 1])])
def test_draws_at_the_ends_of_the_range_take_possible_tokens(
    uniform: float, expected: list[int]
) -> None:
    # Given rows whose first and last tokens are impossible (a grammar's mask)
    class Fixed(RowSampler):
        def _uniforms(self) -> torch.Tensor:
            return torch.full((len(self.generators),), uniform)

    rows = sampler([{}, {"top_k": 2}, {"top_p": 0.5}])
    fixed = Fixed([], [], torch.zeros(0), CPU)
    fixed.__dict__.update(rows.__dict__)
    logits = torch.tensor([[-torch.inf, 1.0, 0.5, -torch.inf, -torch.inf]] * 3)
    # When each row draws 0 or 1 (past what a generator gives, [0, 1))
    tokens = fixed._sample(logits).tolist()
    # Then each gets its first or last kept token in vocabulary order, never a masked one
    assert tokens == expected


def test_a_row_draws_the_same_whatever_its_batch_mates() -> None:
    # Given a seeded row, alone and among rows with other cuts and temperatures
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(5)) * 2
    mine = {"temperature": 0.9, "top_p": 0.9}
    mates = [{"top_k": 5}, {"temperature": 0.3}, {"temperature": 1.5, "top_p": 0.5}]
    alone = sampler([mine], seed=7)
    crowd = sampler([*mates, mine], seed=4)
    crowd.generators[-1] = torch.Generator().manual_seed(7)
    # When both draw ten steps from the same logits
    solo = [int(alone._sample(logits.clone())[0]) for _ in range(10)]
    among = [int(crowd._sample(logits.expand(4, -1).clone())[-1]) for _ in range(10)]
    # Then the row's tokens are the same
    assert solo == among
    assert len(set(solo)) > 1


def test_a_tiny_temperature_draws_the_best_token() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -torch.inf]])
    rows = sampler([{"temperature": 1.4e-45}, {"temperature": 1e-3, "top_p": 0.1}])
    assert rows._sample(logits.expand(2, -1).clone()).tolist() == [1, 1]


def test_ascending_sorts_each_row() -> None:
    values = torch.tensor([[3.0, -torch.inf, 1.0, 2.0], [0.0, -1.0, 5.0, -2.0]])
    assert ascending(values).tolist() == [[-torch.inf, 1.0, 2.0, 3.0], [-2.0, -1.0, 0.0, 5.0]]


@pytest.mark.parametrize("penalty", [1e300, 1e-300])  # inf and 0 once in float32
def test_an_extreme_repetition_penalty_still_draws_a_token(penalty: float) -> None:
    # Given seen tokens whose scores are 0, 1 and -1, and a penalty float32 cannot hold
    rows = sampler([{"repetition_penalty": penalty}, {"repetition_penalty": penalty, "top_p": 0.5}])
    scores = torch.tensor([[0.0, 1.0, -1.0, 0.5]] * 2)
    seen = torch.tensor([[0, 1, 2]] * 2)
    # When the rows draw
    chosen = rows(seen, scores)
    # Then each still gets one token of the vocabulary
    assert chosen.shape == (2, 4)
    assert ((chosen == 0).sum(dim=-1) == 1).all()
