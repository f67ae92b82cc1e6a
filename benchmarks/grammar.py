"""Per-step overhead of JSON-constrained decoding, and JSON Schema support, per library.

Run: ``.venv/bin/python -m benchmarks.grammar``. Every installed candidate (xgrammar,
llguidance, outlines-core, lm-format-enforcer; the project keeps llguidance, so
``pip install --no-deps`` the others to compare) at the tiny model's 2,048 tokens
and at a 32,000-token byte-level BPE trained here on local text. Per step, 16 of
32 rows constrained: fill the masks, advance the matchers by real tokens of valid
JSON (each checked to be allowed), apply the masks (``engine.grammar``'s code,
whatever the library). Support: random walks through 16 schemas' grammars, each
finished document validated with ``jsonschema``.
"""

from __future__ import annotations

import importlib
import json
import random
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROWS, CONSTRAINED, STEPS, WARM_UP, BUDGET_S = 32, 16, 200, 10, 10.0
WALKS, WALK_STEPS = 12, 80

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
OBJECT: dict[str, Any] = {"type": "object"}
_WORDS = ["alpha", "beta", "gamma", "delta", "queue", "worker", "batch", "model", "token", "result"]
_SHIFTS = torch.arange(32, dtype=torch.int32)


def documents(kind: str, count: int, seed: int = 0) -> list[str]:
    """Return ``count`` valid JSON texts for the schema or for ``json_object``."""
    rnd, words = random.Random(seed), _WORDS
    roles = SCHEMA["properties"]["role"]["enum"]
    if kind == "schema":
        return [
            json.dumps(
                {
                    "name": " ".join(rnd.sample(words, 2)),
                    "age": rnd.randint(0, 120),
                    "role": rnd.choice(roles),
                    "active": rnd.random() < 0.5,
                }
            )
            for _ in range(count)
        ]
    return [
        json.dumps(
            {
                rnd.choice(words): rnd.randint(-99, 999),
                "items": rnd.sample(words, 3),
                "nested": {"ok": rnd.random() < 0.5, "score": round(rnd.random(), 3)},
            }
        )
        for _ in range(count)
    ]


def tokenizers() -> list[tuple[str, Any]]:
    """The tiny model's tokenizer and a 32k byte-level BPE trained on local text."""
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.tiny import make_tiny_model

    tiny = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", steps=1)  # its tokenizer
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in sorted(stdlib.glob("*/*.py")) if "site-packages" not in p.parts]
    texts = [*topics.values(), *(p.read_text("utf-8", "replace") for p in stdlib.glob("*.py"))]
    texts += [p.read_text("utf-8", "replace") for p in paths]  # 25 MB in all
    bpe, eos = ByteLevelBPETokenizer(), "<|endoftext|>"
    bpe.train_from_iterator(texts, 32000, special_tokens=[eos], show_progress=False)
    large = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=eos)
    return [("tiny 2k", AutoTokenizer.from_pretrained(tiny)), ("bpe 32k", large)]


class Candidate:
    """One library behind a common interface: prepare, compile, match, fill, advance."""

    name = module = ""

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> None:
        """Build the per-tokenizer data (once per worker)."""

    def compile(self, schema: dict[str, Any]) -> Any:
        """Compile a JSON schema (``{"type": "object"}`` stands for ``json_object``)."""

    def matcher(self, compiled: Any) -> Any:
        """Return a fresh matcher (one per row)."""

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        """Write matcher i's allowed tokens into ``bitmask`` row i (int32, 32 tokens a word)."""

    def advance(self, matcher: Any, token: int) -> bool:
        """Feed the chosen token; False when the matcher rejects it."""
        return False


class XGrammar(Candidate):
    name, module = "xgrammar", "xgrammar"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> None:
        self.xgr = importlib.import_module(self.module)
        info = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = self.xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(  # strict: no properties beyond the schema's
            json.dumps(schema),
            any_whitespace=False,
            separators=(", ", ": "),
            strict_mode=schema != OBJECT,
        )

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


class LLGuidance(Candidate):
    """The production code, ``engine.grammar``: a compiled matcher deep-copied per row."""

    name, module = "llguidance", "llguidance"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> None:
        grammar = importlib.import_module("engine.grammar")
        self.grammars = grammar.Grammars(tokenizer, vocab_size=vocab, stop_ids=[eos], cache_size=0)

    def compile(self, schema: dict[str, Any]) -> Any:
        body = {"name": "bench", "schema": schema}
        return self.grammars.compile(json.dumps({"type": "json_schema", "json_schema": body}))

    def matcher(self, compiled: Any) -> Any:
        return compiled.matcher()

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * 4
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bitmask.data_ptr() + i * row_bytes, row_bytes)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class OutlinesCore(Candidate):
    name, module = "outlines-core", "outlines_core"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> None:
        self.oc = importlib.import_module(self.module)
        slow = importlib.import_module("transformers.convert_slow_tokenizer")
        decoder = {c: b for b, c in slow.bytes_to_unicode().items()}
        by_bytes: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i != eos and i < vocab:
                by_bytes.setdefault(bytes(decoder[c] for c in token), []).append(i)
        self.vocabulary = self.oc.Vocabulary(eos, by_bytes)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), " ?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * 4
        for i, m in enumerate(matchers):
            m.write_mask_into(bitmask.data_ptr() + i * row_bytes, bitmask.shape[1], 4)

    def advance(self, matcher: Any, token: int) -> bool:
        if token == self.vocabulary.get_eos_token_id():  # a finished guide takes no EOS
            return bool(matcher.is_finished())
        matcher.advance(token)
        return True


class FormatEnforcer(Candidate):
    name, module = "lm-format-enforcer", "lmformatenforcer"

    def prepare(self, tokenizer: Any, vocab: int, eos: int) -> None:
        self.lmfe = importlib.import_module(self.module)
        # Its transformers integration does not import under transformers 5: the same
        # table, built here as lmformatenforcer.integrations.transformers builds it.
        zero = tokenizer.encode("0")[-1]
        regular = []
        for i in range(vocab):
            if i != eos:
                after_zero = tokenizer.decode([zero, i])[1:]
                regular.append((i, after_zero, len(after_zero) > len(tokenizer.decode([i]))))
        self.data = self.lmfe.TokenEnforcerTokenizerData(
            regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"), eos, True, vocab
        )

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.lmfe.JsonSchemaParser(None if schema == OBJECT else schema)

    def matcher(self, compiled: Any) -> Any:
        enforcer = self.lmfe.TokenEnforcer(self.data, compiled)
        prompt = [self.data.eos_token_id]
        enforcer.get_allowed_tokens(prompt)  # its first sequence is taken as the prompt
        return [enforcer, prompt]

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        for i, (enforcer, prefix) in enumerate(matchers):
            allowed = enforcer.get_allowed_tokens(prefix).allowed_tokens
            bitmask[i, : allowed.shape[0]] = allowed

    def advance(self, matcher: Any, token: int) -> bool:
        matcher[1].append(token)
        return True


CANDIDATES: list[type[Candidate]] = [XGrammar, LLGuidance, OutlinesCore, FormatEnforcer]

#: Schemas whose keywords an engine may enforce, refuse or (wrongly) ignore.
SUPPORT: list[dict[str, Any]] = [
    SCHEMA,
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "pattern": "^[a-c]+$", "maxLength": 3},
    {"type": "string", "format": "date-time"},
    {"type": "integer", "minimum": 3, "maximum": 7},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": "array", "minItems": 2, "maxItems": 3, "items": {"enum": [1, "a", None]}},
    {"anyOf": [{"type": "integer"}, {"const": {"a": [1, 2]}}]},
    {"$defs": {"n": {"type": "boolean"}}, "type": "array", "items": {"$ref": "#/$defs/n"}},
    {"allOf": [{"type": "integer"}, {"minimum": 3}]},
    {"type": "array", "uniqueItems": True, "items": {"type": "boolean"}},
    {"not": {"type": "string"}},
    {"if": {"type": "integer"}, "then": {"minimum": 5}},
    {"type": "array", "contains": {"type": "integer"}},
    {"oneOf": [{"type": "integer"}, {"type": "number"}]},
    {"type": "object", "properties": {"a": {"enum": [1]}}, "dependentRequired": {"a": ["b"]}},
]


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The production code: ``engine.grammar.apply_bitmask``."""
    grammar = importlib.import_module("engine.grammar")
    result: torch.Tensor = grammar.apply_bitmask(scores, bitmask, rows)
    return result


def _allowed(bitmask: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1
    return [int(i) for i in bits.view(-1)[:vocab].nonzero().view(-1)]


def per_step(
    lib: Candidate, compiled: Any, docs: list[list[int]], vocab: int
) -> tuple[float, float, float, float]:
    """Median ms per step for 16 of 32 rows: fill masks, advance, apply masks, all three."""
    rows = list(range(0, ROWS, ROWS // CONSTRAINED))[:CONSTRAINED]
    matchers = [lib.matcher(compiled) for _ in range(CONSTRAINED)]
    cursor = [(i % len(docs), i % 3) for i in range(CONSTRAINED)]  # (doc, position)
    bitmask = torch.zeros((CONSTRAINED, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(ROWS, vocab)
    fills, advances, applies, totals = [], [], [], []
    began = time.perf_counter()
    for i, (d, p) in enumerate(cursor):  # rows start at different positions
        for token in docs[d][:p]:
            lib.fill([matchers[i]], bitmask)  # lm-format-enforcer advances in its fill
            assert lib.advance(matchers[i], token)
    for step in range(STEPS + WARM_UP):
        tokens = [docs[d][p] for d, p in cursor]
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        t1 = time.perf_counter()
        for m, token in zip(matchers, tokens, strict=True):
            if not lib.advance(m, token):
                raise AssertionError(f"{lib.name} rejected a valid token")
        t2 = time.perf_counter()
        scores = apply_bitmask(logits, bitmask, rows)
        t3 = time.perf_counter()
        for row, token in zip(rows, tokens, strict=True):
            if scores[row, token] == float("-inf"):
                raise AssertionError(f"{lib.name} masked out a valid token")
        for i, (d, p) in enumerate(cursor):
            if p + 1 < len(docs[d]):
                cursor[i] = (d, p + 1)
            else:  # the document ended with EOS: start the next one
                cursor[i] = ((d + CONSTRAINED) % len(docs), 0)
                matchers[i] = lib.matcher(compiled)
        if step >= WARM_UP:
            fills.append(t1 - t0)
            advances.append(t2 - t1)
            applies.append(t3 - t2)
            totals.append(t3 - t0)
        if time.perf_counter() - began > BUDGET_S:
            break
    ms = [statistics.median(x) * 1000 for x in (fills, advances, applies, totals)]
    return ms[0], ms[1], ms[2], ms[3]


def measure(lib: Candidate, label: str, tokenizer: Any) -> list[str]:
    """Return table lines for one library and one tokenizer."""
    vocab, eos = len(tokenizer), int(tokenizer.eos_token_id)
    t0 = time.perf_counter()
    lib.prepare(tokenizer, vocab, eos)
    prepare_ms = (time.perf_counter() - t0) * 1000
    lines = []
    for kind, schema in (("schema", SCHEMA), ("json_object", OBJECT)):
        t0 = time.perf_counter()
        compiled = lib.compile(schema)
        compile_ms = (time.perf_counter() - t0) * 1000
        docs = [[*tokenizer.encode(d), eos] for d in documents(kind, 64)]
        fill, advance, apply, total = per_step(lib, compiled, docs, vocab)
        lines.append(
            f"| {lib.name} | {label} | {kind} | {prepare_ms:,.0f} | {compile_ms:,.1f} "
            f"| {fill:.3f} | {advance:.3f} | {fill + advance:.3f} | {apply:.3f} | {total:.3f} |"
        )
    return lines


def walk(lib: Candidate, compiled: Any, tokenizer: Any, rnd: random.Random) -> str | None:
    """Return the text of one random walk through the grammar, None if it did not finish."""
    vocab, eos = len(tokenizer), int(tokenizer.eos_token_id)
    matcher = lib.matcher(compiled)
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    tokens: list[int] = []
    for _ in range(WALK_STEPS):
        lib.fill([matcher], bitmask)
        allowed = _allowed(bitmask, vocab)
        if eos in allowed and (len(allowed) == 1 or rnd.random() < 0.3):
            return str(tokenizer.decode(tokens))
        allowed = [t for t in allowed if t != eos]
        if rnd.random() < 0.3:  # short tokens close strings and numbers sooner
            allowed = sorted(allowed, key=lambda t: len(tokenizer.decode([t])))[:8]
        tokens.append(rnd.choice(allowed))
        if not lib.advance(matcher, tokens[-1]):
            raise AssertionError(f"{lib.name} rejected a token its mask allowed")
    return None


def support(lib: Candidate, tokenizer: Any) -> str:
    """Return the table line of one library's JSON Schema support (random walks)."""
    validator = importlib.import_module("jsonschema")
    rnd = random.Random(0)
    lib.prepare(tokenizer, len(tokenizer), int(tokenizer.eos_token_id))
    enforced, refused, violated = 0, 0, []
    for schema in SUPPORT:
        keywords = ",".join(k for k in schema if k not in ("type", "$defs"))
        try:
            compiled = lib.compile(schema)
            texts = [walk(lib, compiled, tokenizer, rnd) for _ in range(WALKS)]
        except Exception:
            refused += 1
            continue
        bad = 0
        for text in filter(None, texts):
            try:
                validator.validate(json.loads(text), schema)
            except (ValueError, validator.ValidationError):  # not JSON, or not valid
                bad += 1
        if bad:
            violated.append(f"{keywords} ({bad}/{sum(1 for t in texts if t)})")
        else:
            enforced += 1
    return f"| {lib.name} | {enforced} | {refused} | {len(violated)} | {'; '.join(violated)} |"


def main() -> None:
    """Print both tables (markdown) for every installed candidate."""
    torch.set_num_threads(1)
    libs = []
    for make in CANDIDATES:
        try:
            importlib.import_module(make.module)
            libs.append(make())
        except ImportError:
            print(f"{make.name}: not installed", flush=True)
    toks = tokenizers()
    print(f"\n{ROWS} rows, {CONSTRAINED} constrained; medians of up to {STEPS} steps; ms")
    print(
        "| library | vocab | grammar | prepare | compile | fill masks | advance "
        "| library/step | apply masks | total/step |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for lib in libs:
        for label, tokenizer in toks:
            try:
                lines = measure(lib, label, tokenizer)
            except Exception as exc:  # report and go on with the next candidate
                lines = [f"| {lib.name} | {label} | failed: {type(exc).__name__}: {exc} |"]
            print("\n".join(lines), flush=True)
    print(f"\nJSON Schema: {len(SUPPORT)} schemas, {WALKS} random walks each ({toks[0][0]})")
    print("| library | enforced | refused | violated | violated: keywords (invalid/finished) |")
    print("|---|---:|---:|---:|---|", flush=True)
    for lib in libs:
        print(support(lib, toks[0][1]), flush=True)


if __name__ == "__main__":
    main()
