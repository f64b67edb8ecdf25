"""SentencePiece tokenizers: Meta's ``tokenizer.model`` and new ones trained the paper's way.

The paper's tokenizer (SPEC §1.2) is byte-pair encoding in SentencePiece with every number
split into digits and a fallback to bytes for unknown UTF-8 characters. Meta's model also
uses no text normalisation, keeps runs of whitespace, prefixes a dummy space, and has
unk/bos/eos at 0/1/2 and no pad piece; ``train_tokenizer`` does the same.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from llamaforge.files import atomic_write

__all__ = ["MIN_VOCAB_SIZE", "Tokenizer", "TokenizerError", "train_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer file or training input that cannot be used; the message names it."""


class Tokenizer:
    """A SentencePiece model with Meta's interface: ``encode(text, bos, eos)``, ``decode``."""

    path: Path | None
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.exists():
            raise TokenizerError(f"{p}: tokenizer model not found")
        if not p.is_file():
            raise TokenizerError(f"{p}: is not a file (expected a SentencePiece .model file)")
        self._load(p.read_bytes(), p)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike | None = None) -> Tokenizer:
        """A tokenizer from a serialized SentencePiece model proto (``path`` is for messages)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes expects bytes, got {type(data).__name__}")
        tok = cls.__new__(cls)
        tok._load(bytes(data), Path(path) if path is not None else None)
        return tok

    def _load(self, data: bytes, path: Path | None) -> None:
        where = str(path) if path is not None else "<bytes>"
        if not data:
            raise TokenizerError(f"{where}: not a SentencePiece model (it is empty)")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError as e:
            raise TokenizerError(
                f"{where}: not a SentencePiece model ({_sentencepiece_reason(e)})"
            ) from None
        if sp.vocab_size() <= 0 or sp.vocab_size() != sp.get_piece_size():
            raise TokenizerError(f"{where}: not a SentencePiece model (no pieces)")
        self.path = path
        self._sp = sp
        self._data = data
        self.vocab_size = sp.vocab_size()
        self.bos_id = sp.bos_id()
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id()
        self.unk_id = sp.unk_id()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "<bytes>"
        return f"Tokenizer({where!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``bos`` before and ``eos`` after if asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """``encode`` for many texts at once, on SentencePiece's own thread pool."""
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_batch expects str items, got {type(bad).__name__}")
        batch: list[list[int]] = self._sp.encode(texts, num_threads=num_threads)
        return [self._wrap(ids, bos, eos) for ids in batch]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; negative ids (padding) are dropped."""
        kept = [i for i in map(int, ids) if i >= 0]
        too_big = [i for i in kept if i >= self.vocab_size]
        if too_big:
            raise TokenizerError(
                f"cannot decode ids {too_big[:5]}: the vocabulary has ids 0..{self.vocab_size - 1}"
            )
        return self._sp.decode(kept)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """``decode`` for each sequence of ids."""
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``, or ``unk_id`` when the vocabulary lacks it."""
        return self._sp.piece_to_id(piece)

    def piece_score(self, i: int) -> float:
        """The score of piece ``i`` (for BPE: the merge priority, higher merges first)."""
        return float(self._sp.get_score(int(i)))

    def is_byte(self, i: int) -> bool:
        """Whether ``i`` is a byte-fallback piece such as ``<0x0A>``."""
        return self._sp.is_byte(int(i))

    def is_control(self, i: int) -> bool:
        """Whether ``i`` is a control piece (``<s>``, ``</s>``): never produced by encoding."""
        return self._sp.is_control(int(i))

    def is_unknown(self, i: int) -> bool:
        """Whether ``i`` is the unknown piece (``<unk>``)."""
        return self._sp.is_unknown(int(i))

    def is_unused(self, i: int) -> bool:
        """Whether ``i`` is an unused piece (kept in the vocabulary, never produced)."""
        return self._sp.is_unused(int(i))

    def serialized(self) -> bytes:
        """The model proto: exactly the bytes of a ``tokenizer.model`` file."""
        return self._data

    def sha256(self) -> str:
        """Hex SHA-256 of the serialized model proto."""
        return hashlib.sha256(self._data).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file atomically (temporary file, then rename) and return its path."""
        return atomic_write(path, self._data)


def _sentencepiece_reason(e: RuntimeError) -> str:
    """SentencePiece's error message without its ``INTERNAL: src/x.cc(12) [check]`` prefix."""
    msg = str(e).strip()
    if "ParseFromArray" in msg:
        return "its bytes do not parse as a SentencePiece ModelProto"
    msg = re.sub(r"^INTERNAL:\s*", "", msg)
    msg = re.sub(r"^src/\S+\(\d+\) \[.*?\]\s*", "", msg)
    return msg.rstrip(".") or "SentencePiece refused it"


# unk, bos, eos + the 256 byte pieces + "▁" + at least one character of the corpus.
MIN_VOCAB_SIZE = 3 + 256 + 2

TrainingSource = Iterable[str] | str | os.PathLike | Sequence[str | os.PathLike]


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _documents(source: TrainingSource) -> Iterator[str]:
    """The documents of ``source``: lines of its files or its items. Paths are checked now,
    files are read later, lazily."""
    if isinstance(source, (str, os.PathLike)):
        return _file_lines([_training_file(source)])
    if isinstance(source, (list, tuple)):
        return _file_lines([_training_file(item) for item in source])
    return _checked_documents(source)


def _training_file(item: object) -> Path:
    if not isinstance(item, (str, os.PathLike)):
        raise TokenizerError(
            f"training files must be paths, got {type(item).__name__}; "
            "pass documents as an iterator, e.g. iter(docs)"
        )
    p = Path(item)
    if not p.is_file():
        raise TokenizerError(
            f"{_short(str(p))}: training file not found (a str, a path or a list of them "
            "is read as text files; pass documents as an iterator, e.g. iter(docs))"
        )
    return p


def _file_lines(files: list[Path]) -> Iterator[str]:
    """The lines of each UTF-8 text file, read lazily."""
    for p in files:
        with open(p, encoding="utf-8") as f:
            try:
                yield from f
            except UnicodeDecodeError as e:
                raise TokenizerError(
                    f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None


def _checked_documents(docs: Iterable[str]) -> Iterator[str]:
    for doc in docs:
        if not isinstance(doc, str):
            raise TokenizerError(
                f"training documents must be str, got {type(doc).__name__} "
                "(pass text files as a list of paths)"
            )
        yield doc


def _cut(line: str, max_bytes: int) -> Iterator[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut at a space if there is
    one (the space is dropped: the next piece's dummy prefix stands for it), else between
    characters."""
    data = line.encode("utf-8")
    start = 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        space = data.rfind(b" ", start + 1, end + 1)
        if space > start:
            yield data[start:space].decode("utf-8")
            start = space + 1
            continue
        while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back off to a start
            end -= 1
        yield data[start:end].decode("utf-8")
        start = end
    yield data[start:].decode("utf-8")


def _sentences(docs: Iterable[str], max_bytes: int, count: list[int]) -> Iterator[str]:
    """SentencePiece's unit: the non-blank lines of each document, over-long ones cut."""
    for doc in docs:
        for line in doc.split("\n"):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            # a character takes at most 4 bytes: only long lines need measuring
            pieces = [line] if 4 * len(line) <= max_bytes else _cut(line, max_bytes)
            for piece in pieces:
                if piece.strip():
                    count[0] += 1
                    yield piece


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def train_tokenizer(
    source: TrainingSource,
    output: str | os.PathLike,
    vocab_size: int = 32000,
    *,
    max_sentences: int = 2_000_000,
    max_sentence_length: int = 16384,
    character_coverage: float = 0.99995,
    num_threads: int | None = None,
    overwrite: bool = True,
) -> Tokenizer:
    """Train a SentencePiece BPE tokenizer the paper's way, write it to ``output`` atomically.

    With ``overwrite=False`` an existing ``output`` is a TokenizerError, raised before any
    training (``llamaforge tokenizer train`` passes it unless ``--force``).

    ``source`` is a text file (``str`` or path), a list or tuple of text files, or any other
    iterable of documents (``str``), e.g. a generator or ``iter(list_of_docs)``. Files are
    read as UTF-8, lazily. Documents are split into lines and streamed to SentencePiece,
    which keeps a random sample of at most ``max_sentences`` of them; blank lines are
    skipped and lines longer than ``max_sentence_length`` UTF-8 bytes are cut. Training is
    deterministic unless there are more lines than ``max_sentences``: SentencePiece's
    sample cannot be seeded (it ignores ``set_random_generator_seed``). The settings are
    those of Meta's ``tokenizer.model``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: 3 special pieces, 256 byte pieces, '▁' and "
            f"at least one character need vocab_size >= {MIN_VOCAB_SIZE}"
        )
    if max_sentences < 1:
        raise TokenizerError(f"max_sentences={max_sentences}: expected at least 1")
    if max_sentence_length < 16:
        raise TokenizerError(f"max_sentence_length={max_sentence_length}: expected >= 16 bytes")
    if not 0.0 < character_coverage <= 1.0:
        raise TokenizerError(f"character_coverage={character_coverage}: expected in (0, 1]")
    _check_output(Path(output), overwrite)
    docs = _documents(source)
    count = [0]  # lines handed to SentencePiece
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(docs, max_sentence_length, count),
            model_writer=model,
            # the paper: BPE, numbers split into digits, bytes for unknown characters
            model_type="bpe",
            split_digits=True,
            byte_fallback=True,
            # as in Meta's model: no normalisation, whitespace kept as it is
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            split_by_unicode_script=True,
            split_by_number=True,
            max_sentencepiece_length=16,
            hard_vocab_limit=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            # a bounded random sample of the input
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or _cpu_count(),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(str(e), vocab_size, count[0]) from None
    if count[0] == 0:
        raise TokenizerError("the training corpus is empty (it has no non-blank lines)")
    _check_output(Path(output), overwrite)  # it may have appeared while training ran
    out = atomic_write(output, model.getvalue())
    return Tokenizer.from_bytes(model.getvalue(), out)


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse a directory as ``output``, and an existing file unless ``overwrite``."""
    if output.is_dir():
        raise TokenizerError(f"{output}: is a directory; expected the path of a .model file")
    if not overwrite and (output.exists() or output.is_symlink()):
        raise TokenizerError(f"{output}: already exists; pass --force to replace it")


def _training_error(msg: str, vocab_size: int, lines: int) -> TokenizerError:
    """A clear TokenizerError for a SentencePiece training failure."""
    if lines == 0:
        return TokenizerError("the training corpus is empty (it has no non-blank lines)")
    too_high = re.search(
        r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg
    )
    if too_high:
        return TokenizerError(
            f"vocab_size={too_high.group(1)} is more than this corpus supports: it yields at "
            f"most {too_high.group(2)} pieces; lower vocab_size or train on more text"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_low:
        return TokenizerError(
            f"vocab_size={too_low.group(1)} is too small for this corpus: its characters "
            f"(at character_coverage) and the 259 special and byte pieces need at least "
            f"{too_low.group(2)}; raise vocab_size or lower character_coverage"
        )
    return TokenizerError(
        f"SentencePiece training failed: {_sentencepiece_reason(RuntimeError(msg))}"
    )
