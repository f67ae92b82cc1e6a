"""The tiny local model: a small GPT-2-style causal LM, trained for seconds on local text.

It exists so the demo and the tests run a real transformers model without
reaching the Hugging Face hub. Its byte-level BPE tokenizer and its weights are
trained at build time on English the machine already has (the Python
reference's topics, shipped as text in the standard library's ``pydoc_data``),
so its completions are word-like, if poor. It has a ChatML chat template and
ends a reply at ``<|im_end|>``. It is saved with ``save_pretrained`` and loaded
back through ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any real model.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from completion_queue import ConfigError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: What a built model dir records; a dir without this build's number is rebuilt.
MARKER_FILE = "cq-tiny-model.json"
#: Raise it whenever the build changes what a model dir holds.
BUILD_VERSION = 3
#: The files a build writes, this one or an older one: only such a dir is ever replaced.
_MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    MARKER_FILE,
}

#: ChatML, as Qwen and others render it: system/user/assistant turns with string content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

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

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[.,;:!?]?")
_SENTENCE_END = re.compile(r"(?<=[.!?]) +(?=[A-Z])")


def _reference_paragraphs() -> list[str]:
    """Prose paragraphs of the Python reference's topics: no code, no markup."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.splitlines()
            if para.startswith((" ", "\t")) or (len(lines) > 1 and set(lines[1]) <= set("*=-~^")):
                continue  # code, grammar or a heading
            text = " ".join(line.strip() for line in lines)
            # Split on single spaces: the empty items keep the reference's two spaces
            # after a sentence, so that a prompt ending in spaces is no stranger.
            words = text.replace('"', "").replace("\u2019", "'").split(" ")
            kept = [w for w in words if not w or _WORD.fullmatch(w)]
            n_words, n_kept = sum(map(bool, words)), sum(map(bool, kept))
            if n_kept >= 8 and n_kept >= 0.85 * n_words:
                out.append(" ".join(kept).strip())
    return out


def corpus() -> list[str]:
    """Return the training text, one paragraph per item: the reference's prose and our lines."""
    ours = [line for line in _CORPUS.splitlines() if line.strip()]
    return _reference_paragraphs() + ours * 4


def corpus_words() -> set[str]:
    """Return the lower-cased alphabetic words of the training text."""
    return {w.lower() for w in re.findall(r"[A-Za-z]+", "\n".join(corpus()))}


def chat_exchanges(paragraphs: list[str], rng: random.Random) -> list[list[dict[str, str]]]:
    """Return conversations built from the text: a sentence's first words, then the rest.

    A reply continues the user's words, so it starts with a space, as words in running
    text do: the model knows those tokens best.
    """
    conversations = []
    sentences = [s.split() for para in paragraphs for s in _SENTENCE_END.split(para)]
    for words in sentences:
        if not 6 <= len(words) <= 30:
            continue
        cut = rng.randint(2, min(6, len(words) - 3))
        messages = [
            {"role": "user", "content": " ".join(words[:cut])},
            {"role": "assistant", "content": " " + " ".join(words[cut:])},
        ]
        if rng.random() < 0.2:  # any sentence: a set phrase would leak into plain text
            messages.insert(0, {"role": "system", "content": " ".join(rng.choice(sentences))})
        conversations.append(messages)
    words = sorted({w.strip(".,;:!?").lower() for para in paragraphs for w in para.split()} - {""})
    conversations += [json_exchange(words, rng) for _ in range(len(conversations) // 3)]
    rng.shuffle(conversations)
    return conversations


def json_exchange(words: list[str], rng: random.Random) -> list[dict[str, str]]:
    """Return a request for JSON and a reply of one or two compact pairs, so that a reply
    constrained to JSON (``response_format``) closes its strings and object soon."""
    pairs: dict[str, object] = {}
    for _ in range(2):
        key = rng.choice(words)
        kind = rng.choice(("text", "number", "flag"))
        if kind == "text":
            pairs[key] = " ".join(rng.sample(words, rng.randint(1, 3)))
        else:
            pairs[key] = rng.randint(0, 999) if kind == "number" else rng.random() < 0.5
    subject = " ".join(rng.sample(words, rng.randint(1, 3)))
    reply = json.dumps(dict(list(pairs.items())[: rng.randint(1, 2)]))
    return [
        {"role": "user", "content": f"Describe {subject} as JSON."},
        {"role": "assistant", "content": reply},
    ]


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` threads inside, and the caller's count again after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_threads() -> int:
    """Threads for the build: all cores but one, as the worker's model uses them.

    On a busy machine, as many OpenMP threads as cores run many times slower than one.
    """
    return max(1, min((os.cpu_count() or 1) - 1, 4))


def _train(
    model: Any,
    plain: list[int],
    chats: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch: int,
    length: int,
    seed: int,
    end_id: int,
    end_weight: float = 4.0,
    lr: float = 3e-3,
) -> float:
    """Train ``model`` on windows of plain text and of chats; return the last steps' mean loss.

    ``chats`` holds each conversation's ids and labels (-100 where nothing is learnt).
    """
    import torch

    plain_ids = torch.tensor(plain)
    # Chat rows start at a conversation's start and run on through the next ones: a
    # reply's end is learnt after its header, never out of the blue in plain text.
    chat_ids = torch.tensor([t for ids, _ in chats for t in ids])
    chat_labels = torch.tensor([t for _, labels in chats for t in labels])
    offsets = torch.tensor([0, *itertools.accumulate(len(ids) for ids, _ in chats)][:-1])
    chat_starts = offsets[offsets <= len(chat_ids) - length]
    chat_rows = max(1, batch // 4)  # a quarter of each batch: enough to learn to close a reply
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )

    def windows(ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([ids[s : s + length] for s in starts.tolist()])

    def draw(high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator)

    losses: list[float] = []
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            plain_at = draw(len(plain_ids) - length, batch - chat_rows)
            chat_at = chat_starts[draw(len(chat_starts), chat_rows)]
            text = windows(plain_ids, plain_at)
            x = torch.cat([text, windows(chat_ids, chat_at)])
            labels = torch.cat([text, windows(chat_labels, chat_at)])
            # A reply's <|im_end|> counts ``end_weight`` times: the short training would
            # otherwise leave the model too unsure of it to stop a greedy reply.
            targets = labels[:, 1:].reshape(-1)
            weights = (targets != -100).float() + (end_weight - 1) * (targets == end_id).float()
            logits = model(input_ids=x).logits[:, :-1]
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets, reduction="none"
            )
            loss = (per_token * weights).sum() / weights.sum()
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)


def _chat_rows(
    tokenizer: Any, conversations: list[list[dict[str, str]]]
) -> list[tuple[list[int], list[int]]]:
    """Return each conversation's ids, and labels that teach the replies and their ends alone.

    Headers and other turns are context, never targets: the model must not learn to
    write ``<|im_start|>user``, a role's name or an ``<|im_end|>`` into a plain completion.
    """
    rows = []
    for messages in conversations:
        ids: list[int] = []
        labels: list[int] = []
        for message in messages:
            turn = tokenizer.apply_chat_template([message], tokenize=False)
            turn_ids = tokenizer(turn, add_special_tokens=False).input_ids
            ids += turn_ids
            if message["role"] == "assistant":  # its text and <|im_end|>, not the newline after
                header = f"{IM_START}{message['role']}\n"
                head = len(tokenizer(header, add_special_tokens=False).input_ids)
                labels += [-100] * head + turn_ids[head:-1] + [-100]
            else:
                labels += [-100] * len(turn_ids)
        rows.append((ids, labels))
    return rows


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 2048,
    n_positions: int = 512,
    n_embd: int = 128,
    n_layer: int = 2,
    n_head: int = 4,
    steps: int = 600,
) -> Path:
    """Build the tiny model and tokenizer into ``out_dir`` (atomically) and return it.

    An ``out_dir`` that holds this build's model already is kept; an older build is
    replaced. The same ``seed`` gives the same weights on the same machine. Two layers:
    after a training this short, four write no better words and take twice as long.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    target = Path(out_dir)
    paragraphs = corpus()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        paragraphs,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, IM_START, IM_END],
        show_progress=False,  # its bar would reach a worker's log as blank lines
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=n_positions,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    # Plain text runs on with no <|endoftext|> between paragraphs, so that plain
    # completions run to their budget; only a chat reply learns to end (<|im_end|>).
    rng = random.Random(seed)
    # Some paragraphs end in spaces, as prompts do: what follows them is no stranger.
    ends = ["\n"] * 6 + [" " * k + "\n" for k in range(1, 5)]
    plain_text = "".join(p + rng.choice(ends) for p in rng.sample(paragraphs, len(paragraphs)))
    plain = bpe.encode(plain_text).ids
    chats = _chat_rows(tokenizer, chat_exchanges(paragraphs, rng))

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        resid_pdrop=0.0,  # a few hundred steps: dropout would only slow the learning
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    with torch.random.fork_rng(devices=[]), _torch_threads(_build_threads()):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        loss = _train(
            model, plain, chats, steps=steps, batch=8, length=64, seed=seed, end_id=im_end_id
        )
    model.generation_config.pad_token_id = eos_id
    model.generation_config.eos_token_id = [eos_id, im_end_id]
    hf_logging.disable_progress_bar()  # in a worker, the bar would be logged as a WARNING
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    marker = {"version": BUILD_VERSION, "seed": seed, "steps": steps, "loss": round(loss, 3)}
    (staging / MARKER_FILE).write_text(json.dumps(marker) + "\n")
    _move_into_place(staging, target)
    log.info(
        "built tiny model in %s in %.1fs (loss %.2f)", target, time.perf_counter() - started, loss
    )
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an older build there is replaced, a current one kept."""
    try:
        staging.rename(target)
        return
    except OSError:
        if is_current(target):  # another process built it first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
            return
    if not {p.name for p in target.iterdir()} <= _MODEL_FILES:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{target} holds files other than a tiny model's: not replacing it")
    old = Path(tempfile.mkdtemp(prefix=".tiny-old-", dir=target.parent))
    target.rename(old / "model")
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def is_current(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` holds a tiny model of this build."""
    try:
        marker = json.loads((Path(path) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == BUILD_VERSION


def ensure_tiny_model(path: str | os.PathLike[str]) -> Path:
    """Return ``path``, building the tiny model there first if it is missing or outdated."""
    from filelock import FileLock

    target = Path(path)
    if is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (several workers may start together); the others wait, then see it.
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not is_current(target):
            make_tiny_model(target)
    return target
