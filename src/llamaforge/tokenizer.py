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
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer file or training input that cannot be used; the message names it."""


class Tokenizer:
    """A SentencePiece model with Meta's interface: ``encode(text, bos, eos)``, ``decode``."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"{p}: tokenizer model not found")
        self._init(p.read_bytes(), p)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | os.PathLike | None = None) -> Tokenizer:
        """A tokenizer from a serialized SentencePiece model proto."""
        tok = cls.__new__(cls)
        tok._init(data, Path(path) if path is not None else None)
        return tok

    def _init(self, data: bytes, path: Path | None) -> None:
        where = str(path) if path is not None else "<bytes>"
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerError(
                f"{where}: not a SentencePiece model ({str(e).strip() or type(e).__name__})"
            ) from None
        if sp.vocab_size() <= 0 or sp.vocab_size() != sp.get_piece_size():
            raise TokenizerError(f"{where}: not a SentencePiece model (empty vocabulary)")
        self.path = path
        self._sp = sp
        self._data = data
        self.vocab_size: int = sp.vocab_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()
        self.unk_id: int = sp.unk_id()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "<bytes>"
        return f"Tokenizer({where!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = True, eos: bool = False, num_threads: int = -1
    ) -> list[list[int]]:
        """Encode many texts with SentencePiece's own thread pool."""
        batch = self._sp.encode(list(texts), num_threads=num_threads)
        pre = [self.bos_id] if bos else []
        post = [self.eos_id] if eos else []
        return [pre + ids + post for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; negative ids (padding) are dropped."""
        return self._sp.decode([int(i) for i in ids if int(i) >= 0])

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def is_byte(self, i: int) -> bool:
        return self._sp.is_byte(int(i))

    def serialized(self) -> bytes:
        """The model proto: exactly the bytes of a ``tokenizer.model`` file."""
        return self._data

    def sha256(self) -> str:
        return hashlib.sha256(self._data).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file atomically (temporary file, then rename)."""
        return _atomic_write(Path(path), self._data)


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# 3 special pieces + 256 byte pieces; BPE needs at least a few merges beyond these.
MIN_VOCAB_SIZE = 3 + 256 + 1


def _documents(source) -> Iterator[str]:
    """Documents: the text of a file (a ``str`` or path), of a list of ``Path`` objects, or
    the items of any other iterable of strings."""
    if isinstance(source, (str, os.PathLike)):
        source = [Path(source)]
    elif (
        isinstance(source, (list, tuple))
        and source
        and all(isinstance(x, os.PathLike) for x in source)
    ):
        source = [Path(x) for x in source]
    else:
        yield from source
        return
    for p in source:
        if not p.is_file():
            raise TokenizerError(f"{p}: training file not found")
        with open(p, encoding="utf-8") as f:
            try:
                yield from f
            except UnicodeDecodeError as e:
                raise TokenizerError(
                    f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None


def _sentences(docs: Iterable[str], max_len: int, counter: list[int]) -> Iterator[str]:
    """Non-empty lines of each document, long lines cut into pieces SentencePiece accepts."""
    for doc in docs:
        if not isinstance(doc, str):
            raise TokenizerError(f"training documents must be str, got {type(doc).__name__}")
        for line in doc.splitlines():
            if not line.strip():
                continue
            encoded = line.encode("utf-8")
            if len(encoded) <= max_len:
                counter[0] += 1
                yield line
                continue
            for start in range(0, len(encoded), max_len):  # cut on bytes, keep characters whole
                piece = encoded[start : start + max_len].decode("utf-8", errors="ignore")
                if piece.strip():
                    counter[0] += 1
                    yield piece


def train_tokenizer(
    source: Iterable[str] | str | os.PathLike | Sequence[os.PathLike],
    output: str | os.PathLike,
    vocab_size: int = 32000,
    *,
    max_sentences: int = 2_000_000,
    max_sentence_length: int = 16384,
    character_coverage: float = 0.99995,
    num_threads: int | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Train a SentencePiece BPE tokenizer the paper's way and write it to ``output``.

    ``source`` is a UTF-8 text file (``str`` or ``Path``), a list of ``Path`` objects, or
    any other iterable of documents (strings). The
    input is streamed line by line; SentencePiece samples at most ``max_sentences`` lines
    and lines longer than ``max_sentence_length`` bytes are cut into pieces.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte fallback needs 256 byte pieces and 3 "
            f"special pieces, so use at least {MIN_VOCAB_SIZE}"
        )
    counter = [0]
    model = io.BytesIO()
    trainer_args = dict(
        sentence_iterator=_sentences(_documents(source), max_sentence_length, counter),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        split_by_unicode_script=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads or os.cpu_count() or 1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    spm.set_random_generator_seed(seed)  # the line sampling is reproducible
    try:
        spm.SentencePieceTrainer.train(**trainer_args)
    except RuntimeError as e:
        msg = str(e)
        m = re.search(
            r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg
        )
        if m:
            raise TokenizerError(
                f"vocab_size={m.group(1)} is more than this corpus supports (at most "
                f"{m.group(2)} pieces); lower --vocab-size or give more text"
            ) from None
        if counter[0] == 0:
            raise TokenizerError("the training corpus is empty (no non-blank lines)") from None
        raise TokenizerError(f"SentencePiece training failed: {msg.strip()}") from None
    if counter[0] == 0:
        raise TokenizerError("the training corpus is empty (no non-blank lines)")
    out = _atomic_write(Path(output), model.getvalue())
    return Tokenizer(out)
