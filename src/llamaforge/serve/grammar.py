"""Structured output: grammars compiled by xgrammar, one matcher per constrained row.

A request's ``response_format`` (``json_object``, ``json_schema``) or the extension fields
``guided_regex`` and ``guided_grammar`` (EBNF in xgrammar's dialect) become a `GrammarSpec`;
`GrammarCompiler.compile` turns it into a `Grammar` (xgrammar's compiled token masks over
this tokenizer's vocabulary), and each request that uses it gets a `RowMatcher` of its own:
the tokens it allows next as a bitmask, advanced with each accepted token, terminated when
the grammar is complete (the request then finishes with "stop").

xgrammar was chosen by measurement on this machine's CPU with Meta's tokenizer (vocab
32000; see docs/serving.md): a nested schema compiled in about 10 ms and masked in about
5 microseconds a token, against 54 ms and 1.6 ms for outlines-core; llguidance could not be
given this SentencePiece vocabulary without a tokenizer of the Hugging Face kind.

JSON is generated compactly (no free whitespace between tokens: a model cannot pad it
forever). Compiling runs in the caller's thread, never the engine's: the server compiles in
a worker thread with a time limit (`Server` in `serve.app`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from llamaforge.tokenizer import Tokenizer

__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "GrammarSpec", "RowMatcher"]

KINDS = ("json_object", "json_schema", "regex", "grammar")


class GrammarError(ValueError):
    """A grammar, schema or regex the engine cannot compile (the message names why)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: ``kind`` one of ``KINDS`` and ``source``
    (the JSON schema as JSON text, the regex or the EBNF grammar; empty for json_object);
    ``param`` the request field it came from (for error messages)."""

    kind: str
    source: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind {self.kind!r}: expected one of {KINDS}")


class Grammar:
    """A compiled grammar: shared by every request that asked for the same spec; ``banned``
    the tokens masked besides what the grammar rules out (for JSON: the tokens holding a
    control character, which xgrammar 0.2's masks let into strings through the
    tokenizer's byte tokens, though JSON forbids them unescaped)."""

    def __init__(
        self,
        spec: GrammarSpec,
        compiled: xgr.CompiledGrammar,
        vocab_size: int,
        banned: list[int] | None = None,
    ) -> None:
        self.spec, self.compiled, self.vocab_size = spec, compiled, vocab_size
        self.banned = banned or []

    def matcher(self) -> RowMatcher:
        return RowMatcher(self)


class RowMatcher:
    """One row's position in its grammar."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self._m = xgr.GrammarMatcher(grammar.compiled, terminate_without_stop_token=True)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` (int32, one bit a
        token, `bitmask_for`'s shape)."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False if the grammar does not allow it."""
        return bool(self._m.accept_token(token))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return bool(self._m.is_terminated())


def bitmask_for(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask for ``rows`` rows of ``vocab_size`` tokens (int32, 32 tokens a word)."""
    return xgr.allocate_token_bitmask(rows, vocab_size)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool (rows, vocab_size) from an int32 bitmask (rows, words) on any device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _token_pieces(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The SentencePiece pieces xgrammar reads as a byte-fallback vocabulary (ids beyond the
    tokenizer's, when the model's vocabulary is larger, as unmatchable pieces)."""
    n = len(tokenizer)
    pieces = [tokenizer.id_to_piece(i) for i in range(min(n, vocab_size))]
    return pieces + [f"<unused_{i}>" for i in range(n, vocab_size)]


def _control_tokens(tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """The tokens whose text holds a control character (below U+0020)."""
    out = []
    for i in range(min(len(tokenizer), vocab_size)):
        if tokenizer.is_control(i) or tokenizer.is_unknown(i):
            continue
        if tokenizer.is_byte(i):
            if int(tokenizer.id_to_piece(i)[3:5], 16) < 0x20:
                out.append(i)
        elif any(ord(c) < 0x20 for c in tokenizer.id_to_piece(i)):
            out.append(i)
    return out


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer and model vocabulary (thread-safe; the
    compiled grammars are cached by spec)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cached: int = 64) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo(
            _token_pieces(tokenizer, vocab_size),
            vocab_type=xgr.VocabType.BYTE_FALLBACK,
            vocab_size=vocab_size,
            stop_token_ids=[tokenizer.eos_id],
            add_prefix_space=True,
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._control = _control_tokens(tokenizer, vocab_size)
        self._cache: dict[GrammarSpec, Grammar] = {}
        self._max_cached = max_cached
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> Grammar:
        """``spec`` compiled (or from the cache); GrammarError naming what is wrong."""
        with self._lock:
            hit = self._cache.get(spec)
        if hit is not None:
            return hit
        try:
            compiled = self._compile(spec)
        except GrammarError:
            raise
        except Exception as e:  # xgrammar's errors: RuntimeError, InvalidJSONError, …
            msg = f"{spec.param}: cannot compile the {_what(spec)}: {_line(e)}"
            raise GrammarError(msg) from None
        banned = self._control if spec.kind in ("json_object", "json_schema") else None
        grammar = Grammar(spec, compiled, self.vocab_size, banned)
        with self._lock:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[spec] = grammar
        return grammar

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "json_schema":
            check_schema(json.loads(spec.source), spec.param)
            return c.compile_json_schema(spec.source, any_whitespace=False, strict_mode=True)
        if spec.kind == "regex":
            return c.compile_regex(spec.source)
        return c.compile_grammar(spec.source)


def _what(spec: GrammarSpec) -> str:
    return {
        "json_object": "JSON object grammar",
        "json_schema": "JSON schema",
        "regex": "regex",
        "grammar": "grammar",
    }[spec.kind]


def _line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:199] + "…"


# Schema keywords xgrammar does not enforce: refused rather than silently ignored.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "patternProperties",
        "dependentSchemas",
        "dependentRequired",
        "dependencies",
        "if",
        "then",
        "else",
        "not",
        "unevaluatedProperties",
        "unevaluatedItems",
        "contains",
        "propertyNames",
        "uniqueItems",
        "multipleOf",
    }
)


def check_schema(schema: Any, param: str, path: str = "", depth: int = 0) -> None:
    """Raise GrammarError naming the first construct of ``schema`` this server cannot
    enforce (``param``.path: keyword), or a schema nested deeper than 64 levels."""
    if depth > 64:
        raise GrammarError(f"{param}: the schema is nested more than 64 levels deep")
    if isinstance(schema, dict):
        for key, value in schema.items():
            where = f"{path}.{key}" if path else key
            if key in UNSUPPORTED_KEYWORDS and not _inside_names(path):
                raise GrammarError(
                    f"{param}: the schema keyword {key!r} (at {where}) is not supported"
                )
            check_schema(value, param, where, depth + 1)
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            check_schema(value, param, f"{path}.{i}", depth + 1)


def _inside_names(path: str) -> bool:
    """Whether ``path`` ends in a map of names (a property called "not" is fine)."""
    last = path.rsplit(".", 1)[-1]
    return last in ("properties", "$defs", "definitions")
