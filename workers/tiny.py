"""The tiny local model: a small GPT-2-style causal LM with random weights.

It exists so the demo and the tests run a real transformers model without
reaching the Hugging Face hub. It is saved with ``save_pretrained`` and loaded
back through ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any real model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"

_CORPUS = """
The queue takes a job, the worker takes a batch, and the database keeps the result.
A completion service answers many prompts at once, so the model stays busy.
Once upon a time there was a small model that lived on a very fast machine.
It read every prompt it was given and wrote a few words in return.
The weather today is cold and clear, with wind from the north and snow on the hills.
Python is a programming language that lets you work quickly and integrate systems.
Redis is an in-memory data store used as a database, cache and message broker.
SQL databases store rows in tables; a transaction commits all of its changes or none.
Numbers: zero one two three four five six seven eight nine ten eleven twelve.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))
Question: what is the capital of France? Answer: Paris.
Dear team, thank you for your message. We will reply within two working days.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Errors should never pass silently, unless explicitly silenced.
The river runs past the old mill, under the bridge and out to the sea.
She opened the door, looked at the sky, and decided to walk to the station.
In 1969 people walked on the moon; in 2026 machines write text for people.
"""


def _corpus() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    return lines * 4


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    n_positions: int = 512,
    n_embd: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
) -> Path:
    """Build the tiny model and tokenizer into ``out_dir`` (atomically) and return it."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    staging.chmod(0o755)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=n_positions,
    )
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = eos_id
    hf_logging.disable_progress_bar()  # in a worker, the bar would be logged as a WARNING
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        # Another process built it first; keep theirs.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    log.info("built tiny model in %s", target)
    return target


def ensure_tiny_model(path: str | os.PathLike[str]) -> Path:
    """Return ``path``, building the tiny model there first if it is missing."""
    target = Path(path)
    if not (target / "config.json").is_file():
        make_tiny_model(target)
    return target
