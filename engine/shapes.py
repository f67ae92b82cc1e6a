"""Local models by shape: the tiny trained one, or a real-size one with random weights.

``gpt2-small`` has GPT-2-small's shape (12 layers, 768 wide, 12 heads, 1,024
positions, a 50,257-token vocabulary: 124M parameters) and random weights, for
benchmarks whose cost per step should be a real model's, not Python's. It uses
the tiny model's tokenizer (same prompts, same ids, same chat template and
EOS), its vocabulary padded to the model's 50,257 ids by ``<|pad_N|>`` entries
in the BPE vocabulary itself: no merge makes them, so text encodes as with the
tiny model, and every id a random model emits decodes to some text. (As added
tokens instead, llguidance takes 12 s to prepare the tokenizer, against 0.25 s;
left out, the ids past the tokenizer decode to nothing.) It is saved with
``save_pretrained`` and loads through ``from_pretrained`` like any model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from completion_queue import ConfigError
from engine.tiny import ensure_tiny_model, make_tiny_model

log = logging.getLogger(__name__)

#: GPT2Config arguments of each shape built with random weights.
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "gpt2-small": {
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50_257,
    },
}
#: Every shape ``make_shaped_model`` builds: the trained tiny model, then the random ones.
SHAPES = ("tiny", *RANDOM_SHAPES)
#: The tokenizer's files, copied from the tiny model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
#: What a shaped model dir records: its shape, seed and parameter count.
SHAPE_FILE = "cq-shape.json"


def make_shaped_model(
    out_dir: str | os.PathLike[str],
    *,
    shape: str,
    seed: int = 0,
    tokenizer_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Build a model of ``shape`` into ``out_dir`` (atomically) and return it.

    Args:
        out_dir: where the model goes; it must not exist, or be empty.
        shape: ``tiny`` (:func:`engine.tiny.make_tiny_model`) or ``gpt2-small``.
        seed: the weights' seed: the same seed gives the same weights.
        tokenizer_from: where the tiny model is (built there first if missing or
            outdated), whose tokenizer a random shape takes; None: build one in a
            temporary directory (about 20 s), removed afterwards.

    Raises:
        ConfigError: an unknown shape, or ``out_dir`` holds files.
    """
    if shape not in SHAPES:
        raise ConfigError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if shape == "tiny":
        return make_tiny_model(out_dir, seed=seed)
    target = Path(out_dir)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target} exists and is not empty: not building a model there")
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{shape}-", dir=target.parent))
    try:
        staging.chmod(0o755)
        with _tiny_model(tokenizer_from) as tiny:
            params = _build_random(staging, tiny, RANDOM_SHAPES[shape], seed)
        marker = {"shape": shape, "seed": seed, "params": params}
        (staging / SHAPE_FILE).write_text(json.dumps(marker) + "\n")
        staging.rename(target)  # over an empty dir, or none
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "built %s model (%d parameters) in %s in %.1fs",
        shape,
        params,
        target,
        time.perf_counter() - started,
    )
    return target


@contextmanager
def _tiny_model(path: str | os.PathLike[str] | None) -> Iterator[Path]:
    """The tiny model at ``path`` (built if needed), or one built in a temporary dir."""
    if path is not None:
        yield ensure_tiny_model(path)
        return
    with tempfile.TemporaryDirectory(prefix="cq-tiny-") as tmp:
        yield make_tiny_model(Path(tmp) / "tiny")


def _build_random(staging: Path, tiny: Path, dims: dict[str, int], seed: int) -> int:
    """Write a random model of ``dims`` with ``tiny``'s tokenizer into ``staging``.

    Return its parameter count.
    """
    import torch
    from transformers import AutoConfig, GenerationConfig, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copyfile(tiny / name, staging / name)
    pad_vocabulary(staging / "tokenizer.json", dims["vocab_size"])
    settings_file = staging / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["model_max_length"] = dims["n_positions"]
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    tiny_config: Any = AutoConfig.from_pretrained(tiny)
    tiny_generation = GenerationConfig.from_pretrained(tiny)
    config = GPT2Config(
        **dims,
        bos_token_id=tiny_config.bos_token_id,
        eos_token_id=tiny_config.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = tiny_generation.pad_token_id
    model.generation_config.eos_token_id = tiny_generation.eos_token_id
    hf_logging.disable_progress_bar()  # in a worker, the bar would be logged as a WARNING
    model.save_pretrained(staging)
    return sum(p.numel() for p in model.parameters())


def pad_vocabulary(tokenizer_json: Path, size: int) -> None:
    """Add ``<|pad_N|>`` entries to a BPE tokenizer file's vocabulary, up to ``size`` ids.

    No merge produces them and the pre-tokenizer splits such text apart, so every
    text encodes as before; each new id decodes to its own ``<|pad_N|>``.
    """
    state = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = state["model"]["vocab"]
    known = max(
        [*vocab.values(), *(token["id"] for token in state.get("added_tokens", []))], default=-1
    )
    if known + 1 > size:
        raise ConfigError(f"the tokenizer has {known + 1} ids, more than the model's {size}")
    for token_id in range(known + 1, size):
        vocab[f"<|pad_{token_id}|>"] = token_id
    tokenizer_json.write_text(json.dumps(state, ensure_ascii=False))
