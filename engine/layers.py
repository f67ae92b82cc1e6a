"""Faster linear layers for decoding in bfloat16 on CPU: oneDNN's prepacked weights.

A ``torch.nn.Linear`` in bfloat16 on CPU hands its weight to oneDNN in the
plain layout, and oneDNN reorders it into its blocked (AMX / AVX512-BF16) layout
on every call: at a decode step, with 32 rows, that reorder costs about as much
as the product. :func:`pack_linears` reorders each weight once, at load, with
the op PyTorch's own compiler uses when it freezes a model
(``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``; no
public API offers it without ``torch.compile``, whose freezing fails on
transformers' static cache, see docs/benchmarks.md). Measured here (one thread,
bfloat16): 1.5 to 1.65 times as fast per product at 32 and 128 rows, bit-equal outputs.

GPT-2-family checkpoints use transformers' ``Conv1D`` (``x @ W + b`` with W
stored in x out) instead of ``nn.Linear``; :func:`conv1d_to_linear` turns each
into an ``nn.Linear`` first (the same product, the weight transposed once), so
it is packed too.

Only CPU and bfloat16: float32 gains less there (1.1 to 1.3 times) and its sums
change in the last bits, where the suite compares float32 texts with a direct
``generate``. :func:`pack_linears` checks one layer against the plain one and
changes nothing if the op is missing or disagrees.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """``nn.Linear``'s product with its weight reordered once for oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``; the op needs a contiguous input for bit-equal results."""
        return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
            x.contiguous(), self.packed, self.bias, "none", [], ""
        )


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace each transformers ``Conv1D`` in ``model`` by its ``nn.Linear``; return how many."""
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                # No random initialisation: both parameters are overwritten at once.
                linear = nn.utils.skip_init(  # type: ignore[no-untyped-call]
                    nn.Linear, n_in, n_out, dtype=child.weight.dtype, device=child.weight.device
                )
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def packing_applies(model: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """True when :func:`pack_linears` may speed ``model`` up: bfloat16 on a CPU with oneDNN."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linears(model: nn.Module) -> int:
    """Turn ``Conv1D`` layers into ``nn.Linear``, then pack every ``nn.Linear``; return how many.

    Checks a probe layer of the model's dtype against its plain product first; on
    any difference or error, nothing is changed and 0 is returned.
    """
    dtype = next(model.parameters()).dtype
    if not _agrees(nn.Linear(64, 32, dtype=dtype)):
        return 0
    conv1d_to_linear(model)
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in found:
        setattr(parent, name, PackedLinear(child))
    return len(found)


def _agrees(linear: nn.Linear) -> bool:
    """True when the packed product of ``linear`` equals its plain one on a probe input."""
    try:
        with torch.inference_mode():
            probe = torch.randn(3, 5, linear.in_features, dtype=linear.weight.dtype)
            same: Any = torch.equal(PackedLinear(linear)(probe), linear(probe))
    except (RuntimeError, AttributeError) as exc:
        log.info("prepacked linear layers are not available here: %s", exc)
        return False
    if not same:
        log.info("prepacked linear layers differ from plain ones here; not used")
    return bool(same)
