"""Instruction data: readers, tokenized examples with a held-out split, and batch loaders.

* **Readers.** Every file becomes :class:`Example` conversations
  (``[{"role": "system"|"user"|"assistant", "content": str}]``). Formats: ``alpaca``
  (instruction/input/output), ``dolly`` (instruction/context/response), ``self_instruct``
  (instruction + instances, one example per instance), ``sharegpt`` (conversations of
  from/value), ``openai`` (messages of role/content) and ``qa`` (question/answer, e.g. GSM8K);
  files are a JSON array or JSON lines, or a folder written by ``datasets``'
  ``save_to_disk``. The format is detected from the first record's keys unless forced. A bad
  record is an error naming the file and line (or record index) and what was expected; with
  ``skip_bad`` it is skipped and counted by reason. Memory is bounded per record: files are
  read in blocks, and a record longer than ``max_record_bytes`` (a JSON line, an element of
  a JSON array — found by the array's brackets and commas — or a saved dataset's row) is a
  bad record (``too_large``) that is never held whole. So are a record that is not UTF-8
  (``bad_utf8``, naming its byte offset in the file) and JSON that Python cannot take
  (nested past its recursion limit, an integer of thousands of digits). A UTF-8 byte order
  mark is skipped, lines end at LF, CRLF or CR; a compressed file, or a JSON array whose own
  structure breaks (a missing comma, a file that ends inside it), is an error.
* **Examples.** Each conversation is tokenized with a chat template
  (:func:`llamaforge.chat_templates.tokenize_conversation`); a stable hash of its messages
  puts it in the validation split (``val_fraction``) as the pretraining data's hash split
  does; one longer than ``max_len`` positions is truncated or dropped. Only its first
  ``max_len + 2`` tokens are worked out (the answers that start later are not rendered), so
  a conversation of thousands of turns costs the turns that fit.
* **Loaders.** ``PaddedLoader`` (one example per row) and ``PackedLoader`` (examples packed
  into rows of ``seq_len`` with per-example positions and document ids, from which the model
  builds the block-diagonal causal mask). An example of n tokens takes n - 1 positions:
  inputs ``ids[:-1]``, targets ``labels[1:]``, shifted within the example, so no example
  predicts or attends to another. Both (one shared constructor) read the global batch's
  contiguous ``1 / world_size`` share for their rank, shuffle with a seeded permutation per
  epoch and resume exactly from ``state_dict()``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llamaforge.chat_templates import (
    IGNORE_INDEX,
    ChatTemplate,
    ChatTemplateError,
    ChatTemplateLimitError,
    load_template,
    tokenize_conversation,
)
from llamaforge.config import setting
from llamaforge.data.base import DataError

__all__ = [
    "FORMATS",
    "BadRecord",
    "Example",
    "InstructDataConfig",
    "InstructDataError",
    "InstructDataset",
    "PackedLoader",
    "PaddedLoader",
    "ReadResult",
    "TokenizedExample",
    "build_dataset",
    "check_conversation",
    "detect_format",
    "example_is_val",
    "pack_rows",
    "padding_waste",
    "read_examples",
    "tokenize_examples",
]

Message = dict[str, str]


class InstructDataError(DataError):
    """Instruction data that cannot be used; the message names the file and record."""


class BadRecord(InstructDataError):
    """One record that cannot be read; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """One conversation and where it comes from (``file:line`` or ``file[index]``)."""

    messages: list[Message]
    source: str


@dataclass
class ReadResult:
    """The examples of a file and the records skipped, counted by reason."""

    examples: list[Example]
    skipped: Counter[str] = field(default_factory=Counter)
    format: str = ""


# -- records ---------------------------------------------------------------------------------

MAX_RECORD_BYTES = 4 << 20  # the default of ``max_record_bytes``
_BLOCK = 1 << 20  # bytes of a JSON line read at a time, past max_record_bytes
_ARRAY_BLOCK = 1 << 18  # bytes of a JSON array scanned at a time
_SLACK = 256  # whitespace after an array element held with it (not counted in its size)
# each byte's part in JSON's structure: 1 opens, -1 closes, 2 a comma, 0 none
_STRUCTURE = np.zeros(256, dtype=np.int64)
_STRUCTURE[[ord("["), ord("{")]], _STRUCTURE[[ord("]"), ord("}")]], _STRUCTURE[ord(",")] = 1, -1, 2
_BOM = b"\xef\xbb\xbf"
_PIECE = re.compile(rb"[^\r]+")  # a line of a JSON lines file, between CRs
_SURROGATE = re.compile("[\ud800-\udfff]")
# how a file that is not JSON text starts, and what it is
_MAGIC = {
    b"\x1f\x8b": "gzip-compressed",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"PK\x03\x04": "a zip archive",
    b"PAR1": "a Parquet file",
    b"\xff\xfe": "UTF-16 text",
    b"\xfe\xff": "UTF-16 text",
}


def _too_large(where: str, max_bytes: int) -> BadRecord:
    return BadRecord(
        "too_large",
        f"{where}: the record is longer than {max_bytes} bytes (data.max_record_bytes), so it "
        "is not read; raise max_record_bytes to read it, or set skip_bad to skip it",
    )


def _bad_utf8(where: str, byte: int, offset: int) -> BadRecord:
    return BadRecord(
        "bad_utf8",
        f"{where}: invalid UTF-8 (byte 0x{byte:02x} at byte offset {offset} of the file); "
        "expected UTF-8 text",
    )


def _json_value(text: str, where: str, expected: str) -> Any:
    """``json.loads(text)``, or a BadRecord (returned, not raised) naming ``where`` and what
    was ``expected``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno} of it"
        why = f"{e.msg.removesuffix(' at')} at {at}"  # ("Invalid control character at")
    except RecursionError:
        why = "nested too deeply"
    except ValueError as e:  # e.g. an integer of more digits than int() takes
        why = str(e).split(";")[0]
    return BadRecord("malformed_json", f"{where}: malformed JSON ({why}); expected {expected}")


def _records(path: Path, split: str, max_bytes: int) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record. A record that cannot be read (malformed JSON, invalid
    UTF-8, longer than ``max_bytes``) is yielded as a BadRecord; one longer than
    ``max_bytes`` is never held whole."""
    if path.is_dir():
        yield from _hf_records(path, split, max_bytes)
        return
    if not path.exists():
        raise InstructDataError(f"{path}: file not found")
    if not path.is_file():
        raise InstructDataError(f"{path}: not a file or a folder; expected JSON or JSON lines")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            for magic, what in _MAGIC.items():
                if head.startswith(magic):
                    raise InstructDataError(
                        f"{path}: {what}; expected JSON or JSON lines text (decompress or "
                        "convert it first)"
                    )
            start = len(_BOM) if head.startswith(_BOM) else 0
            f.seek(start)
            first = b""  # the first byte that is not whitespace
            while not first and (block := f.read(_ARRAY_BLOCK)):
                first = block.lstrip(b" \t\r\n")[:1]
            f.seek(start)
            if first == b"[":
                yield from _JsonArray(f, path, start, max_bytes)
            else:
                yield from _json_lines(f, path, start, max_bytes)
    except OSError as e:
        raise InstructDataError(f"{path}: cannot read ({e.strerror or e})") from None


def _json_lines(f: Any, path: Path, offset: int, max_bytes: int) -> Iterator[tuple[str, Any]]:
    """The records of a JSON lines file, each line read holding at most ``max_bytes`` bytes
    of it. A line ends at LF or CRLF, or at a CR as in Python's text files (a CR alone is
    seen within the ``max_bytes`` read at once: a file of CR line ends alone, longer, is
    one line that is too long)."""
    n = 0
    while line := f.readline(max_bytes + 1):
        at, offset = offset, offset + len(line)
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the line, not kept
                line = f.readline(_BLOCK)
                offset += len(line)
            n += 1
            yield f"{path}:{n}", _too_large(f"{path}:{n}", max_bytes)
            continue
        body = line[:-1] if line.endswith(b"\n") else line
        body = body[:-1] if body.endswith(b"\r") else body
        cr = prev = 0  # the CRs before the piece, counted up to prev
        for m in _PIECE.finditer(body):
            cr, prev = cr + body.count(b"\r", prev, m.start()), m.start()
            where = f"{path}:{n + 1 + cr}"
            if m.group().strip():
                try:
                    text = m.group().decode("utf-8")
                except UnicodeDecodeError as e:
                    yield (
                        where,
                        _bad_utf8(where, body[m.start() + e.start], at + m.start() + e.start),
                    )
                else:
                    yield where, _json_value(text, where, "one JSON object per line")
        n += 1 + body.count(b"\r")


class _JsonArray:
    """The records of a file holding one JSON array, read in blocks of bytes. Where each
    element ends is found by the file's structure alone (the brackets and commas outside
    strings, counted a block at a time with numpy), so an element is held only while it is
    at most ``max_bytes`` long (a longer one is skipped unread, a bad record), and one that
    is not UTF-8 or not JSON is a bad record too. Text that breaks the array's own structure
    (a missing comma, a file that ends inside the array) is an error naming its line."""

    def __init__(self, f: Any, path: Path, offset: int, max_bytes: int) -> None:
        self.f, self.path, self.max = f, path, max_bytes
        self.line, self.offset = 1, offset  # of the next byte to be consumed
        self.depth, self.in_string, self.backslashes = 0, 0, 0  # (odd or even) after a block
        self.index = 0
        self.parts: list[bytes] = []
        self.size = 0
        self.at: tuple[int, int] | None = None  # line and offset of the element's first byte

    def _fail(self, what: str) -> InstructDataError:
        return InstructDataError(
            f"{self.path}: line {self.line}: {what}; expected a JSON array of records "
            "(or JSON lines)"
        )

    def _escaped(self, a: np.ndarray) -> np.ndarray:
        """The positions in ``a`` that a backslash escapes (after an odd run of them)."""
        at = np.flatnonzero(a == 0x5C)
        carry, self.backslashes = self.backslashes, 0
        if not len(at):
            return np.array([0] if carry else [], dtype=np.int64)
        cut = np.flatnonzero(np.diff(at) != 1)
        starts, ends = at[np.r_[0, cut + 1]], at[np.r_[cut, len(at) - 1]]
        runs = ends - starts + 1
        if starts[0] == 0:
            runs[0] += carry
        escaped = ends[runs % 2 == 1] + 1
        if escaped.size and escaped[-1] == len(a):  # the next block's first byte
            escaped, self.backslashes = escaped[:-1], 1
        return np.r_[0, escaped] if carry and starts[0] != 0 else escaped

    def _marks(self, block: bytes) -> list[int]:
        """Where in ``block`` the array opens, each comma between its elements, and where
        the array closes; the state (depth, inside a string, escaping) goes on to the next."""
        a = np.frombuffer(block, dtype=np.uint8)
        quotes = np.flatnonzero(a == 0x22)
        escaped = self._escaped(a)
        if escaped.size:
            quotes = quotes[~np.isin(quotes, escaped)]
        kind = _STRUCTURE[a]
        at = np.flatnonzero(kind)
        outside = (np.searchsorted(quotes, at) + self.in_string) % 2 == 0
        self.in_string = (len(quotes) + self.in_string) % 2
        at = at[outside]
        kind = kind[at]
        delta = np.where(kind == 2, 0, kind)
        after = self.depth + np.cumsum(delta)
        before = after - delta
        self.depth = int(after[-1]) if len(after) else self.depth
        ends = ((delta == 1) & (before == 0)) | ((delta == -1) & (after == 0))
        return at[ends | ((kind == 2) & (before == 1))].tolist()

    def _consume(self, piece: bytes, keep: bool) -> None:
        """Move past ``piece``; with ``keep`` it is part of the element (from its first byte
        that is not whitespace)."""
        kept = piece
        if keep and self.at is None:
            kept = piece.lstrip()
            lead = len(piece) - len(kept)
            if kept:
                self.at = (self.line + piece.count(b"\n", 0, lead), self.offset + lead)
        if keep and self.at is not None:
            self.size += len(kept)
            if self.size <= self.max + _SLACK:
                self.parts.append(kept)
            else:
                self.parts.clear()
        self.line += piece.count(b"\n")
        self.offset += len(piece)

    def _after_the_array(self, rest: bytes) -> None:
        """An error for text after the array's closing bracket (whitespace is fine)."""
        text = rest.lstrip()
        if text:
            self.line += rest.count(b"\n", 0, len(rest) - len(text))
            raise self._fail("text after the array's closing ']'")

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        opened = closed = False
        while block := self.f.read(_ARRAY_BLOCK):
            if closed:
                self._after_the_array(block)
                continue
            pos = 0
            for m in self._marks(block):
                if opened:
                    self._consume(block[pos:m], keep=True)
                    closed = block[m] in b"]}"
                    if record := self._element(closed):
                        yield record
                else:
                    self._consume(block[:m], keep=False)
                opened = True
                self._consume(block[m : m + 1], keep=False)
                pos = m + 1
                if closed:
                    self._after_the_array(block[pos:])
                    break
            else:
                self._consume(block[pos:], keep=True)
        if not closed:
            raise self._fail(f"the file ends inside the array, in record {self.index}")

    def _element(self, closing: bool) -> tuple[str, Any] | None:
        """The element just read (None for the end of an empty array)."""
        i, at, size, data = self.index, self.at, self.size, b"".join(self.parts)
        self.index, self.at, self.size, self.parts = i + 1, None, 0, []
        if at is None:
            if closing and i == 0:
                return None
            raise self._fail(f"expected record {i}, found {']' if closing else ','!r}")
        where = f"{self.path}[{i}]"
        label = f"{where} (line {at[0]})"
        data = data.rstrip(b" \t\r\n")
        if size > self.max + _SLACK or len(data) > self.max:
            return where, _too_large(label, self.max)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return where, _bad_utf8(label, data[e.start], at[1] + e.start)
        try:
            return where, json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # two values: the comma between them is missing
                self.line = at[0] + text.count("\n", 0, e.pos)
                raise self._fail(
                    f"expected ',' or ']' after record {i}, found {text[e.pos]!r}"
                ) from None
        except (ValueError, RecursionError):
            pass
        return where, _json_value(text, label, "a JSON object")


def _text_bytes(value: Any, limit: int) -> int:
    """The UTF-8 bytes of the strings in ``value`` (nested), counted until past ``limit``."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "replace"))
    if not isinstance(value, (Mapping, list, tuple)):
        return 0
    items = value.items() if isinstance(value, Mapping) else value
    total = 0
    for item in items:
        total += _text_bytes(item, limit - total)
        if total > limit:
            break
    return total


def _hf_records(path: Path, split: str, max_bytes: int) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise InstructDataError(
            f"{path}: a folder is read as a Hugging Face dataset, which needs the `datasets` "
            "package (pip install llamaforge[data])"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a folder of other files, damaged metadata or arrow files
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InstructDataError(
            f"{path}: not a dataset saved with datasets' save_to_disk ({why})"
        ) from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InstructDataError(
                f"{path}: the dataset has no split {split!r}; it has {sorted(ds)}"
            )
        ds, where = ds[split], f"{path}/{split}"
    for i, row in enumerate(ds):
        at = f"{where}[row {i}]"
        yield at, _too_large(at, max_bytes) if _text_bytes(row, max_bytes) > max_bytes else row


# -- formats ---------------------------------------------------------------------------------

# the keys that identify a format, in the order they are tried
_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("openai", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("self_instruct", ("instruction", "instances")),
    ("dolly", ("instruction", "response")),
    ("alpaca", ("instruction", "output")),
    ("qa", ("question", "answer")),
]
FORMATS: tuple[str, ...] = tuple(name for name, _ in _SIGNATURES)
_EXPECTED = "; ".join(f"{name}: {'/'.join(keys)}" for name, keys in _SIGNATURES)


def detect_format(record: Any, where: str = "record") -> str:
    """The format whose keys ``record`` has."""
    if isinstance(record, Mapping):
        for name, keys in _SIGNATURES:
            if all(k in record for k in keys):
                return name
        got = sorted(record)
    else:
        got = type(record).__name__  # type: ignore[assignment]
    raise InstructDataError(
        f"{where}: cannot tell the format from the keys {got}; expected one of ({_EXPECTED}), "
        f"or set format to one of {list(FORMATS)}"
    )


def _text(rec: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise BadRecord("missing_field", f"{where}: missing field {key!r}")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise BadRecord(
            "wrong_type", f"{where}: field {key!r} is {type(value).__name__}, expected a string"
        )
    if m := _SURROGATE.search(value):  # a JSON escape such as \ud800 alone: not text
        raise BadRecord(
            "lone_surrogate",
            f"{where}: field {key!r} holds \\u{ord(m.group()):04x}, half of a UTF-16 pair "
            "(not a character); expected text",
        )
    return value


def _answer(text: str, key: str, where: str) -> str:
    if not text.strip():
        raise BadRecord("empty_response", f"{where}: field {key!r} (the response) is empty")
    return text


def _prompt(instruction: str, extra: str, where: str, key: str = "instruction") -> str:
    if not instruction.strip():
        raise BadRecord("empty_prompt", f"{where}: field {key!r} (the prompt) is empty")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _pair(user: str, assistant: str) -> list[Message]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _alpaca(rec: Mapping[str, Any], where: str) -> list[list[Message]]:
    out = _answer(_text(rec, "output", where), "output", where)
    return [
        _pair(
            _prompt(
                _text(rec, "instruction", where), _text(rec, "input", where, required=False), where
            ),
            out,
        )
    ]


def _dolly(rec: Mapping[str, Any], where: str) -> list[list[Message]]:
    out = _answer(_text(rec, "response", where), "response", where)
    return [
        _pair(
            _prompt(
                _text(rec, "instruction", where),
                _text(rec, "context", where, required=False),
                where,
            ),
            out,
        )
    ]


def _qa(rec: Mapping[str, Any], where: str) -> list[list[Message]]:
    out = _answer(_text(rec, "answer", where), "answer", where)
    return [_pair(_prompt(_text(rec, "question", where), "", where, "question"), out)]


def _self_instruct(rec: Mapping[str, Any], where: str) -> list[list[Message]]:
    instruction = _text(rec, "instruction", where)
    instances = rec.get("instances")
    if not isinstance(instances, list) or not instances:
        raise BadRecord(
            "missing_field",
            f"{where}: field 'instances' must be a non-empty list of {{input, output}}",
        )
    convs = []
    for j, inst in enumerate(instances):
        at = f"{where} instance {j}"
        if not isinstance(inst, Mapping):
            raise BadRecord("wrong_type", f"{at}: expected an object with input/output")
        out = _answer(_text(inst, "output", at), "output", at)
        convs.append(_pair(_prompt(instruction, _text(inst, "input", at, required=False), at), out))
    return convs


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def _turns(
    rec: Mapping[str, Any],
    where: str,
    list_key: str,
    role_key: str,
    text_key: str,
    roles: dict[str, str],
) -> list[list[Message]]:
    turns = rec.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord("missing_field", f"{where}: field {list_key!r} must be a non-empty list")
    messages: list[Message] = []
    for j, turn in enumerate(turns):
        at = f"{where} {list_key}[{j}]"
        if not isinstance(turn, Mapping):
            raise BadRecord("wrong_type", f"{at}: expected an object with {role_key}/{text_key}")
        role = _text(turn, role_key, at)
        if role not in roles:
            raise BadRecord(
                "unknown_role",
                f"{at}: unknown role {role!r}; expected one of {sorted(roles)}",
            )
        messages.append({"role": roles[role], "content": _text(turn, text_key, at)})
    check_conversation(messages, where)
    return [messages]


def check_conversation(messages: Sequence[Mapping[str, str]], where: str) -> None:
    """An optional system message, then user and assistant alternating, ending with the
    assistant; no empty message."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord(
                "not_alternating",
                f"{where}: message {j + len(messages) - len(body)} is {m['role']!r}, expected "
                f"{want!r} (after an optional system message, user and assistant alternate)",
            )
        if not m["content"].strip():
            reason = "empty_response" if want == "assistant" else "empty_prompt"
            raise BadRecord(
                reason, f"{where}: message {j + len(messages) - len(body)} ({want}) is empty"
            )
    if not body or body[-1]["role"] != "assistant":
        raise BadRecord(
            "no_response", f"{where}: the conversation does not end with an assistant message"
        )


def _sharegpt(rec: Mapping[str, Any], where: str) -> list[list[Message]]:
    return _turns(rec, where, "conversations", "from", "value", _SHAREGPT_ROLES)


def _openai(rec: Mapping[str, Any], where: str) -> list[list[Message]]:
    return _turns(rec, where, "messages", "role", "content", _OPENAI_ROLES)


_CONVERTERS = {
    "alpaca": _alpaca,
    "dolly": _dolly,
    "self_instruct": _self_instruct,
    "sharegpt": _sharegpt,
    "openai": _openai,
    "qa": _qa,
}


def read_examples(
    path: str | Path,
    format: str = "auto",
    *,
    skip_bad: bool = False,
    split: str = "train",
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> ReadResult:
    """The conversations of one file (or ``save_to_disk`` folder, its ``split``); a record
    longer than ``max_record_bytes`` is a bad record, never read whole."""
    path = Path(path)
    if format != "auto" and format not in _CONVERTERS:
        raise InstructDataError(
            f"unknown format {format!r}; expected 'auto' or one of {list(FORMATS)}"
        )
    if type(max_record_bytes) is not int or max_record_bytes < 1:
        raise InstructDataError(f"max_record_bytes={max_record_bytes!r}: expected at least 1")
    result = ReadResult([], Counter(), "" if format == "auto" else format)
    for where, rec in _records(path, split, max_record_bytes):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if not isinstance(rec, Mapping):
                raise BadRecord(
                    "not_an_object", f"{where}: expected a JSON object, got {type(rec).__name__}"
                )
            if not result.format:
                result.format = detect_format(rec, where)
            convs = _CONVERTERS[result.format](rec, where)
        except BadRecord as e:
            if not skip_bad:
                raise
            result.skipped[e.reason] += 1
            continue
        for j, messages in enumerate(convs):
            src = where if len(convs) == 1 else f"{where} instance {j}"
            result.examples.append(Example(messages, src))
    return result


# -- tokenized examples ------------------------------------------------------------------------


@dataclass
class InstructDataConfig:
    """Instruction data for finetuning."""

    paths: list[str] = setting(
        doc="instruction files (JSON, JSONL) or save_to_disk folders", factory=list
    )
    format: str = setting("auto", f"record format: auto or one of {', '.join(FORMATS)}")
    split: str = setting("train", "split of a saved Hugging Face DatasetDict")
    template: str = setting("alpaca", "chat template: alpaca, llama2, hermes or a .jinja file")
    max_len: int = setting(2048, "most positions per example (its tokens minus one)")
    overlong: Literal["truncate", "drop"] = setting(
        "truncate", "examples longer than max_len: truncate or drop"
    )
    val_fraction: float = setting(0.02, "fraction of examples held out, by content hash")
    skip_bad: bool = setting(False, "skip (and count) bad records instead of failing")
    max_record_bytes: int = setting(
        MAX_RECORD_BYTES, "longest record read (a JSON line or array element), in bytes"
    )
    train_on_prompt: bool = setting(False, "train on prompt tokens too, not only answers")
    packing: bool = setting(False, "pack several examples per row of seq_len tokens")
    seed: int = setting(0, "seed of the per-epoch shuffles")


@dataclass(frozen=True)
class TokenizedExample:
    """``ids`` and ``labels`` (-100 where not trained) of one example, same length."""

    ids: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def positions(self) -> int:
        """Positions the example takes in a row: inputs ids[:-1], targets labels[1:]."""
        return len(self.ids) - 1


@dataclass
class InstructDataset:
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    report: dict[str, Any]


def example_is_val(messages: Sequence[Mapping[str, str]], fraction: float) -> bool:
    """Whether an example is held out: the blake2b hash of its messages (canonical JSON),
    as the pretraining data's split hashes a document's text."""
    if fraction <= 0:
        return False
    text = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False)
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    template: ChatTemplate | str = "alpaca",
    *,
    max_len: int = 2048,
    overlong: str = "truncate",
    train_on_prompt: bool = False,
    skip_bad: bool = False,
    counts: Counter[str] | None = None,
) -> list[TokenizedExample]:
    """Each example's (ids, labels); overlong ones truncated to ``max_len + 1`` tokens or
    dropped, counted in ``counts`` (as are template errors when ``skip_bad``)."""
    if overlong not in ("truncate", "drop"):
        raise InstructDataError(f"overlong={overlong!r}: expected 'truncate' or 'drop'")
    if max_len < 1:
        raise InstructDataError(f"max_len={max_len}: expected at least 1")
    tpl = template if isinstance(template, ChatTemplate) else load_template(template)
    counts = counts if counts is not None else Counter()
    out = []
    for ex in examples:
        try:  # max_len + 2 ids: the max_len + 1 kept, and one more that tells it was longer
            ids, labels = tokenize_conversation(
                tpl, tokenizer, ex.messages, train_on_prompt=train_on_prompt, max_tokens=max_len + 2
            )
        except ChatTemplateLimitError as e:  # slow for one, likely slow for all: stop
            raise InstructDataError(f"{ex.source}: {e}") from None
        except ChatTemplateError as e:
            if not skip_bad:
                raise InstructDataError(f"{ex.source}: {e}") from None
            counts["skipped_template"] += 1
            continue
        if len(ids) - 1 > max_len:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, labels = ids[: max_len + 1], labels[: max_len + 1]
            if all(lab == IGNORE_INDEX for lab in labels[1:]):
                counts["dropped_no_target_after_truncation"] += 1
                continue
            counts["truncated"] += 1
        out.append(
            TokenizedExample(
                np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), ex.source
            )
        )
    return out


def _token_counts(examples: Sequence[TokenizedExample]) -> dict[str, int]:
    trained = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples)
    positions = sum(e.positions for e in examples)
    return {
        "examples": len(examples),
        "positions": positions,
        "trained_tokens": trained,
        "prompt_tokens": positions - trained,
    }


def build_dataset(cfg: InstructDataConfig, tokenizer: Any) -> InstructDataset:
    """Read ``cfg.paths``, split by example hash, tokenize; the report counts examples read
    and skipped (by reason), train/val examples, trained and prompt tokens, truncations and
    drops."""
    if not cfg.paths:
        raise InstructDataError("no instruction data: set paths")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InstructDataError(f"val_fraction={cfg.val_fraction}: expected in [0, 1)")
    tpl = load_template(cfg.template)
    counts: Counter[str] = Counter()
    train_ex: list[Example] = []
    val_ex: list[Example] = []
    files = {}
    for p in cfg.paths:
        r = read_examples(
            p,
            cfg.format,
            skip_bad=cfg.skip_bad,
            split=cfg.split,
            max_record_bytes=cfg.max_record_bytes,
        )
        files[str(p)] = {
            "format": r.format,
            "examples": len(r.examples),
            "skipped": dict(r.skipped),
        }
        counts.update({f"skipped_{k}": v for k, v in r.skipped.items()})
        counts["read"] += len(r.examples)
        for ex in r.examples:
            (val_ex if example_is_val(ex.messages, cfg.val_fraction) else train_ex).append(ex)
    kw: dict[str, Any] = dict(
        max_len=cfg.max_len,
        overlong=cfg.overlong,
        train_on_prompt=cfg.train_on_prompt,
        skip_bad=cfg.skip_bad,
        counts=counts,
    )
    train = tokenize_examples(train_ex, tokenizer, tpl, **kw)
    val = tokenize_examples(val_ex, tokenizer, tpl, **kw)
    if not train:
        raise InstructDataError(f"no training examples left in {cfg.paths} ({dict(counts)})")
    for key in ("truncated", "dropped_overlong", "dropped_no_target_after_truncation"):
        counts.setdefault(key, 0)
    report = {
        "files": files,
        "counts": dict(counts),
        "train": _token_counts(train),
        "val": _token_counts(val),
    }
    return InstructDataset(train, val, report)


# -- loaders -----------------------------------------------------------------------------------


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Loader:
    """The shared stream over ``examples``: each epoch is a seeded order of units (examples,
    or packed rows, whose count may differ between epochs); a step takes ``global_batch``
    units, crossing into the next epoch when one runs out, and this rank reads its contiguous
    share. The state is (epoch, position in epoch), the same on every rank. Rows hold at most
    ``seq_len`` positions (``_check_lengths``), padded with ``pad_id``."""

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        global_batch: int,
        seq_len: int | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not examples:
            raise InstructDataError("no examples to load")
        if global_batch < 1 or global_batch % world_size:
            raise InstructDataError(
                f"global batch {global_batch} is not a positive multiple of {world_size} ranks"
            )
        if not 0 <= rank < world_size:
            raise InstructDataError(f"rank {rank} is not in [0, {world_size})")
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seed, self.shuffle, self.device = seed, shuffle, torch.device(device)
        self.epoch_index, self.position = 0, 0
        self._cache: dict[int, list[Any]] = {}
        self.real_tokens = 0  # non-padding positions of the last batch (the trainer's count)
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self._lengths = [e.positions for e in self.examples]
        self._check_lengths()

    def _check_lengths(self) -> None:
        """Raise ``InstructDataError`` if an example cannot fit a row."""
        longest = max(self._lengths)
        if self.seq_len is not None and longest > self.seq_len:
            raise InstructDataError(
                f"an example takes {longest} positions, more than seq_len={self.seq_len}"
            )

    def _units(self, epoch: int) -> list[Any]:
        raise NotImplementedError

    def _epoch(self, epoch: int) -> list[Any]:
        if epoch not in self._cache:
            self._cache = {e: u for e, u in self._cache.items() if e == epoch - 1}
            self._cache[epoch] = self._units(epoch)
        return self._cache[epoch]

    def _walk(self, epoch: int, pos: int, count: int) -> tuple[int, int, list[Any]]:
        """The ``count`` units from (epoch, pos) and the position after them."""
        out: list[Any] = []
        while len(out) < count:
            units = self._epoch(epoch)
            take = units[pos : pos + count - len(out)]
            out += take
            pos += len(take)
            if pos >= len(units):
                epoch, pos = epoch + 1, 0
        return epoch, pos, out

    def _take(self) -> list[Any]:
        """This rank's units of the next global batch; advances the state."""
        local = self.global_batch // self.world_size
        self.epoch_index, self.position, units = self._walk(
            self.epoch_index, self.position, self.global_batch
        )
        return units[self.rank * local : (self.rank + 1) * local]

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self.epoch_index + self.position / len(self._epoch(self.epoch_index))

    def __iter__(self) -> _Loader:
        return self

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _key(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "global_batch": self.global_batch,
            "shuffle": self.shuffle,
            "examples": len(self.examples),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch_index, "position": self.position, **self._key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._key()
        other = {k: state.get(k) for k in mine}
        if other != mine:
            raise InstructDataError(f"loader state is for {other}, not {mine}")
        self.epoch_index, self.position = int(state["epoch"]), int(state["position"])


class PaddedLoader(_Loader):
    """One example per row, right-padded to the longest row of this rank's batch (or to
    ``seq_len``); yields ``(x, y)`` with y = -100 on padding. Inputs are padded with
    ``pad_id`` (never a target, and causal attention keeps real tokens from seeing it)."""

    def _units(self, epoch: int) -> list[Any]:
        return _epoch_order(len(self.examples), self.seed, epoch, self.shuffle).tolist()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in self._take()]
        width = self.seq_len or max(e.positions for e in rows)
        self.real_tokens = sum(e.positions for e in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(rows):
            n = e.positions
            x[r, :n] = torch.from_numpy(e.ids[:-1])
            y[r, :n] = torch.from_numpy(e.labels[1:])
        return self._to(x), self._to(y)

    def _key(self) -> dict[str, Any]:
        return {**super()._key(), "kind": "padded"}


def pack_rows(
    lengths: Sequence[int], order: Sequence[int], seq_len: int, open_rows: int = 16
) -> list[list[int]]:
    """Example indices per row, each row's lengths summing to at most ``seq_len``: greedy
    first-fit in ``order`` over the last ``open_rows`` rows still open (a row that falls out of
    that window is closed), rows in the order they were opened."""
    rows: list[list[int]] = []
    free: list[int] = []
    first_open = 0
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise InstructDataError(f"an example takes {n} positions, more than seq_len={seq_len}")
        for r in range(first_open, len(rows)):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
            first_open = max(first_open, len(rows) - open_rows)
    return rows


class PackedLoader(_Loader):
    """Rows of exactly ``seq_len`` positions holding several examples each; ``global_batch``
    counts rows. Yields ``(x, y, extras)``, ``extras = {"positions": (rows, seq_len) long,
    restarting at 0 at each example, "documents": (rows, seq_len) long, each position's
    example in its row}`` — the model's keyword arguments: a position attends to the earlier
    ones of its example (``model.document_mask``), no dense mask is carried. Targets are
    shifted within each example (so an example's first token is never a target and its last
    never predicts the next example); the row's tail is padding (``pad_id``, y = -100), a
    document of its own so that none of its positions is left without a key."""

    def _check_lengths(self) -> None:
        if self.seq_len is None:
            raise InstructDataError("PackedLoader: set seq_len, the positions of a packed row")
        pack_rows(self._lengths, range(len(self.examples)), self.seq_len)

    def _units(self, epoch: int) -> list[Any]:
        order = _epoch_order(len(self.examples), self.seed, epoch, self.shuffle).tolist()
        return pack_rows(self._lengths, order, self.seq_len)  # type: ignore[arg-type]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        rows = self._take()
        shape = (len(rows), self.seq_len)
        x = torch.full(shape, self.pad_id, dtype=torch.long)
        y = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros(shape, dtype=torch.long)
        doc = torch.zeros(shape, dtype=torch.long)
        self.real_tokens = sum(self._lengths[i] for members in rows for i in members)
        for r, members in enumerate(rows):
            at = 0
            for d, i in enumerate(members):
                e = self.examples[i]
                n = e.positions
                x[r, at : at + n] = torch.from_numpy(e.ids[:-1])
                y[r, at : at + n] = torch.from_numpy(e.labels[1:])
                pos[r, at : at + n] = torch.arange(n)
                doc[r, at : at + n] = d
                at += n
            pos[r, at:] = torch.arange(shape[1] - at)
            doc[r, at:] = len(members)  # padding: a document of its own
        extras = {"positions": self._to(pos), "documents": self._to(doc)}
        return self._to(x), self._to(y), extras

    def _key(self) -> dict[str, Any]:
        return {**super()._key(), "kind": "packed", "seq_len": self.seq_len}


def padding_waste(
    examples: Sequence[TokenizedExample],
    seq_len: int,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
) -> dict[str, float]:
    """Fraction of row positions that are padding over one epoch, for ``padded`` (batches of
    ``batch_size`` rows padded to their longest example, the loader's order) and ``packed``
    (rows of ``seq_len``)."""
    lengths = [e.positions for e in examples]
    if not lengths:
        raise InstructDataError("no examples")
    total = sum(lengths)
    order = _epoch_order(len(lengths), seed, 0, shuffle).tolist()
    padded = sum(
        max(lengths[i] for i in order[b : b + batch_size]) * len(order[b : b + batch_size])
        for b in range(0, len(order), batch_size)
    )
    packed = len(pack_rows(lengths, order, seq_len)) * seq_len
    return {"padded": 1 - total / padded, "packed": 1 - total / packed}
