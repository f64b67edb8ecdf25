"""The tokenizer: Meta's tokenizer.model against sentencepiece itself, and tokenizers trained
the paper's way on the Python standard library. Real files only, no mocks."""

from __future__ import annotations

import os
import random
import re
import struct
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.tokenizer import MIN_VOCAB_SIZE, Tokenizer, TokenizerError, _cut, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
META_MODEL = SHARED_DATA / "tokenizer" / "llama" / "tokenizer.model"

TRICKY = [
    "Hello world",
    "",
    " ",
    " leading space",
    "   three leading spaces",
    "multiple   inner    spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\nfour\n",
    "\ttabs\tand\t\ttabs",
    "\r\nwindows line end\r\n",
    "12345 and 3.14159 and -0007",
    "year 2023: 1,000,000 tokens",
    "emoji 😀🦙👩‍👩‍👧 flags 🇫🇷",
    "日本語のテキスト、中文文本",
    "Русский текст и українська",
    "العربية والعبرית",
    "combining: e\u0301 vs \u00e9, n\u0303",
    "NFKC would change these: ﬁ Ａ ½ ²",
    "control \x00 \x01 \x7f bytes",
    "rare \U0010fffd \U0001d49c \u2028 \ufeff \ufffd",
    "<s> </s> <unk> look like specials",
]

# The settings that make a tokenizer the paper's kind, as stored in the model's trainer_spec
# and normalizer_spec: name -> (message, field number, proto default), numbers from
# sentencepiece_model.proto. Meta's tokenizer.model has exactly these values.
SPEC_FIELDS = {
    "model_type": ("trainer", 3, 1),  # 1 UNIGRAM, 2 BPE
    "split_digits": ("trainer", 25, False),
    "byte_fallback": ("trainer", 35, False),
    "split_by_number": ("trainer", 23, True),
    "split_by_whitespace": ("trainer", 22, True),
    "split_by_unicode_script": ("trainer", 21, True),
    "allow_whitespace_only_pieces": ("trainer", 26, False),
    "treat_whitespace_as_suffix": ("trainer", 24, False),
    "max_sentencepiece_length": ("trainer", 20, 16),
    "hard_vocab_limit": ("trainer", 33, True),
    "character_coverage": ("trainer", 10, 0.9995),
    "unk_id": ("trainer", 40, 0),
    "bos_id": ("trainer", 41, 1),
    "eos_id": ("trainer", 42, 2),
    "pad_id": ("trainer", 43, -1),
    "normalizer": ("normalizer", 1, ""),
    "add_dummy_prefix": ("normalizer", 3, True),
    "remove_extra_whitespaces": ("normalizer", 4, True),
    "escape_whitespaces": ("normalizer", 5, True),
}
PAPER_SPEC = {
    "model_type": 2,
    "split_digits": True,
    "byte_fallback": True,
    "split_by_number": True,
    "split_by_whitespace": True,
    "split_by_unicode_script": True,
    "allow_whitespace_only_pieces": True,
    "treat_whitespace_as_suffix": False,
    "max_sentencepiece_length": 16,
    "hard_vocab_limit": True,
    "character_coverage": 0.99995,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "normalizer": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "escape_whitespaces": True,
}


def _proto_fields(buf: bytes) -> dict[int, int | bytes]:
    """The last value of each field of a protobuf message (varints as int, else bytes)."""
    fields: dict[int, int | bytes] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            fields[key >> 3] = varint()
            continue
        size = {1: 8, 5: 4}.get(wire) or varint()  # fixed64, fixed32, length-delimited
        fields[key >> 3] = buf[pos : pos + size]
        pos += size
    return fields


def model_spec(data: bytes) -> dict[str, object]:
    """SPEC_FIELDS read from a serialized ModelProto (trainer_spec=2, normalizer_spec=3)."""
    top = _proto_fields(data)
    messages = {"trainer": _proto_fields(top[2]), "normalizer": _proto_fields(top[3])}
    spec: dict[str, object] = {}
    for name, (message, number, default) in SPEC_FIELDS.items():
        raw = messages[message].get(number)
        if raw is None:
            value = default
        elif isinstance(default, float):
            value = round(struct.unpack("<f", raw)[0], 6)
        elif isinstance(default, str):
            value = raw.decode()
        elif isinstance(default, bool):
            value = bool(raw)
        else:
            value = raw - (1 << 64) if raw >= 1 << 63 else raw  # int32 -1 is 10 bytes
        spec[name] = value
    return spec


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.id_to_piece(i) for i in tok.encode(text, bos=False)]


def byte_pieces(text: str) -> list[str]:
    return [f"<0x{b:02X}>" for b in text.encode("utf-8")]


def multi_char_digit_pieces(tok: Tokenizer) -> list[str]:
    """Vocabulary pieces that hold an ASCII digit and anything else (none with split_digits)."""
    vocab = (tok.id_to_piece(i) for i in range(tok.vocab_size) if not tok.is_byte(i))
    return [p for p in vocab if re.search("[0-9]", p) and len(p) > 1]


# ---------------------------------------------------------------------------------------
# Meta's tokenizer.model


@pytest.fixture(scope="module")
def meta() -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    if not META_MODEL.is_file():
        pytest.skip(
            f"{META_MODEL} not found: set LLAMAFORGE_SHARED_DATA to the shared data folder "
            "holding tokenizer/llama/tokenizer.model"
        )
    return Tokenizer(META_MODEL), spm.SentencePieceProcessor(model_file=str(META_MODEL))


def test_meta_known_ids_and_specials(meta):
    tok, _ = meta
    assert tok.encode("Hello world", bos=False) == [15043, 3186]
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("Hello world", eos=True) == [1, 15043, 3186, 2]
    assert tok.encode("Hello world", bos=False, eos=True) == [15043, 3186, 2]
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == len(tok) == 32000
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tok.is_byte(3) and tok.id_to_piece(258) == "<0xFF>" and not tok.is_byte(259)
    assert tok.piece_to_id("▁Hello") == 15043
    assert tok.piece_to_id("surely-not-a-piece") == tok.unk_id
    assert tok.path == META_MODEL


def test_meta_piece_accessors_match_sentencepiece(meta):
    tok, sp = meta
    assert tok.is_unknown(0) and tok.is_control(1) and tok.is_control(2)
    assert not (tok.is_control(3) or tok.is_unknown(3) or tok.is_unused(3))
    for i in (0, 1, 2, 3, 258, 259, 15043, 31999):
        assert tok.piece_score(i) == sp.get_score(i) and isinstance(tok.piece_score(i), float)
        kinds = (tok.is_byte(i), tok.is_control(i), tok.is_unknown(i), tok.is_unused(i))
        assert kinds == (sp.is_byte(i), sp.is_control(i), sp.is_unknown(i), sp.is_unused(i))


def test_meta_trainer_spec_is_the_papers(meta):
    tok, _ = meta
    assert model_spec(tok.serialized()) == PAPER_SPEC


@pytest.mark.parametrize("text", TRICKY)
def test_meta_ids_equal_sentencepiece_and_roundtrip(meta, text):
    tok, sp = meta
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_meta_splits_digits_and_falls_back_to_bytes(meta):
    tok, _ = meta
    assert pieces(tok, "12345") == ["▁", "1", "2", "3", "4", "5"]
    assert pieces(tok, "x2023") == ["▁x", "2", "0", "2", "3"]
    assert multi_char_digit_pieces(tok) == []
    assert pieces(tok, "\x00")[1:] == ["<0x00>"]
    assert pieces(tok, "\U0010fffd")[1:] == byte_pieces("\U0010fffd")
    assert tok.unk_id not in tok.encode("".join(TRICKY))


def test_meta_the_one_text_that_does_not_roundtrip(meta):
    # SentencePiece writes spaces as "▁" (U+2581), so a real "▁" in the text decodes as a
    # space. It is the only character that does not round-trip: every other code point,
    # alone and between letters, does (checked over all of Unicode when writing this).
    tok, _ = meta
    assert tok.decode(tok.encode("a▁b")) == "a b"
    assert tok.decode(tok.encode("▁")) == " "


# Any text without "▁": identity normalisation keeps every character, runs of whitespace and
# leading/trailing spaces, and byte fallback covers what the vocabulary lacks. Surrogates
# are not valid text (str.encode("utf-8") refuses them), so they are excluded.
FRAGMENTS = st.sampled_from(
    [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0", "\x00", "\x7f", "\u2581"]
    + ["7", "42", "日本", "e\u0301", "😀", "\u200d", "\ufeff", "<s>", "</s>", "ﬁ"]
)
TEXTS = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=8), FRAGMENTS),
    max_size=10,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_meta_roundtrip_property(meta, text):
    tok, sp = meta
    ids = tok.encode(text, bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text.replace("\u2581", " ")


def test_meta_batches_and_padding(meta):
    tok, _ = meta
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    assert tok.encode_batch(TRICKY, bos=False, eos=True, num_threads=1) == [
        tok.encode(t, bos=False, eos=True) for t in TRICKY
    ]
    assert tok.encode_batch([]) == []
    ids = tok.encode("Hello world")
    assert tok.decode([-1, *ids, -1, -1]) == "Hello world"
    assert tok.decode_batch([ids + [-1] * 3, ids[:2], [-1]]) == ["Hello world", "Hello", ""]
    with pytest.raises(TokenizerError, match=r"ids \[32000\].*0\.\.31999"):
        tok.decode([15043, 32000])
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_meta_serialized_save_and_from_bytes(meta, tmp_path):
    tok, _ = meta
    assert tok.serialized() == META_MODEL.read_bytes()
    target = tmp_path / "sub" / "tokenizer.model"
    target.parent.mkdir()
    target.write_bytes(b"an older file")
    assert tok.save(target) == target
    assert target.read_bytes() == META_MODEL.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["tokenizer.model"]  # no temp files
    copy = Tokenizer.from_bytes(tok.serialized())
    assert copy.path is None and copy.sha256() == tok.sha256() == Tokenizer(target).sha256()
    assert copy.encode("Hello world") == [1, 15043, 3186]


# ---------------------------------------------------------------------------------------
# Training the paper's way on the standard library's own source


@pytest.fixture(scope="module")
def stdlib_files() -> list[Path]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]  # about 1 MB
    if len(files) < 40:
        pytest.skip("the Python standard library's .py files are not on disk")
    return files


@pytest.fixture(scope="module")
def trained(stdlib_files, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(stdlib_files, tmp_path_factory.mktemp("tok") / "code.model", 800)


def test_trained_has_the_papers_settings(trained):
    assert model_spec(trained.serialized()) == PAPER_SPEC
    assert trained.vocab_size == len(trained) == 800
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, -1)
    assert [trained.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == [
        *["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    ]
    assert trained.serialized() == Path(trained.path).read_bytes()


def test_trained_splits_digits(trained):
    assert pieces(trained, "2024") == ["▁", "2", "0", "2", "4"]
    assert pieces(trained, "x = 2024")[-4:] == ["2", "0", "2", "4"]
    assert multi_char_digit_pieces(trained) == []


@pytest.mark.parametrize("char", ["☃", "日本", "🦙", "ﬁ"])
def test_trained_falls_back_to_bytes(trained, char):
    # none of these is in the corpus; "ﬁ" also shows there is no NFKC (it would become "fi")
    assert pieces(trained, char) == ["▁", *byte_pieces(char)]
    assert trained.decode(trained.encode(char)) == char


@settings(max_examples=100, deadline=None)
@given(TEXTS)
def test_trained_roundtrip_property(trained, text):
    assert trained.decode(trained.encode(text)) == text.replace("\u2581", " ")


def test_trained_keeps_code_whitespace(trained):
    text = "def f(x):\n    return  x\t# two  spaces \n\n"
    assert trained.decode(trained.encode(text)) == text
    assert trained.piece_to_id("▁▁▁▁") != trained.unk_id  # indentation became pieces


def test_training_from_documents_files_and_one_file_agree(stdlib_files, trained, tmp_path):
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files]
    from_docs = train_tokenizer((t for t in texts), tmp_path / "docs.model", vocab_size=800)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(t if t.endswith("\n") else t + "\n" for t in texts), "utf-8")
    from_file = train_tokenizer(str(corpus), tmp_path / "file.model", vocab_size=800)
    assert from_docs.serialized() == from_file.serialized() == trained.serialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "docs.model", "file.model"]


def test_training_samples_at_most_max_sentences(stdlib_files, tmp_path):
    tok = train_tokenizer(stdlib_files, tmp_path / "t.model", 400, max_sentences=500)
    assert _proto_fields(_proto_fields(tok.serialized())[2])[11] == 500  # input_sentence_size
    assert tok.vocab_size == 400


def test_training_cuts_long_lines(tmp_path):
    # SentencePiece would skip lines this long; cut, they still teach it their words
    docs = ["alpha beta " * 3000, "日本語" * 5000, "gamma delta"]
    tok = train_tokenizer(iter(docs), tmp_path / "t.model", 300, max_sentence_length=1024)
    for piece in ("▁alpha", "▁beta", "日本"):
        assert tok.piece_to_id(piece) != tok.unk_id, piece


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=300), st.integers(16, 64))
def test_cut_keeps_every_character_within_the_limit(line, max_bytes):
    cut = list(_cut(line, max_bytes))
    assert all(len(piece.encode("utf-8")) <= max_bytes for piece in cut)
    # cuts fall between characters or on a space, which is dropped
    assert "".join(cut).replace(" ", "") == line.replace(" ", "")
    assert len("".join(cut)) >= len(line) - (len(cut) - 1)


# ---------------------------------------------------------------------------------------
# Errors


def test_loading_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"nope\.model: tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match="is not a file"):
        Tokenizer(tmp_path)
    text = tmp_path / "text.model"
    text.write_text("this is not a sentencepiece model\n")
    noise = tmp_path / "noise.model"
    noise.write_bytes(random.Random(0).randbytes(4096))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    for bad in (text, noise, empty):
        with pytest.raises(TokenizerError, match=rf"{bad.name}: not a SentencePiece model"):
            Tokenizer(bad)
    with pytest.raises(TokenizerError, match="<bytes>: not a SentencePiece model"):
        Tokenizer.from_bytes(b"\x08\x01")


def test_vocab_too_high_names_both_sizes_and_the_maximum_is_real(tmp_path):
    out = tmp_path / "t.model"
    with pytest.raises(TokenizerError, match=r"vocab_size=5000 .* at most (\d+) pieces") as e:
        train_tokenizer(iter(["tiny corpus"] * 20), out, vocab_size=5000)
    assert "lower vocab_size" in str(e.value) and not out.exists()
    most = int(re.search(r"at most (\d+)", str(e.value)).group(1))
    assert MIN_VOCAB_SIZE < most < 5000
    assert train_tokenizer(iter(["tiny corpus"] * 20), out, vocab_size=most).vocab_size == most
    with pytest.raises(TokenizerError, match=f"vocab_size={most + 1} is more"):
        train_tokenizer(iter(["tiny corpus"] * 20), out, vocab_size=most + 1)


def test_vocab_too_low(tmp_path):
    with pytest.raises(TokenizerError, match=rf"vocab_size=100 .* >= {MIN_VOCAB_SIZE}"):
        train_tokenizer(iter(["tiny corpus"]), tmp_path / "t.model", vocab_size=100)
    many_chars = "".join(chr(0x4E00 + i) for i in range(100))  # 100 characters + "▁"
    with pytest.raises(TokenizerError, match="vocab_size=300 .* at least 360; raise vocab_size"):
        train_tokenizer(iter([many_chars] * 5), tmp_path / "t.model", vocab_size=300)
    assert not (tmp_path / "t.model").exists()


def test_corpus_errors(tmp_path):
    out = tmp_path / "out.model"
    out.write_bytes(b"kept")
    with pytest.raises(TokenizerError, match="corpus is empty"):
        train_tokenizer(iter(["", "  \n\n \t", "\r\n"]), out, vocab_size=300)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TokenizerError, match="corpus is empty"):
        train_tokenizer(tmp_path / "empty.txt", out, vocab_size=300)
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    with pytest.raises(TokenizerError, match=r"missing\.txt: training file not found"):
        train_tokenizer([good, tmp_path / "missing.txt"], out, vocab_size=300)
    with pytest.raises(TokenizerError, match=r"missing\.txt: training file not found"):
        train_tokenizer(str(tmp_path / "missing.txt"), out, vocab_size=300)
    # a list is read as file paths: documents in a list get a hint, not a silent misreading
    with pytest.raises(TokenizerError, match=r"not found .*iter\(docs\)"):
        train_tokenizer(["a document, not a path"], out, vocab_size=300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    with pytest.raises(TokenizerError, match=r"latin1\.txt: not UTF-8"):
        train_tokenizer(latin1, out, vocab_size=300)
    with pytest.raises(TokenizerError, match="documents must be str, got bytes"):
        train_tokenizer(iter([b"bytes"]), out, vocab_size=300)
    assert out.read_bytes() == b"kept"  # failed training leaves the output alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *["empty.txt", "good.txt", "latin1.txt", "out.model"]
    ]


def test_cli_train_refuses_an_existing_out_without_force(tmp_path, capsys):
    from llamaforge.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("tiny corpus, a few words\n" * 20)
    out = tmp_path / "t.model"
    out.write_bytes(b"precious")
    args = ["tokenizer", "train", str(corpus), "--out", str(out), "--vocab-size", "280"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out}: already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    with pytest.raises(TokenizerError, match="already exists"):  # the library's keyword
        train_tokenizer(corpus, out, vocab_size=280, overwrite=False)
    assert main([*args, "--force"]) == 0
    assert Tokenizer(out).vocab_size == 280
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "t.model"]
