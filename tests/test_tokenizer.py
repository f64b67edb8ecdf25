"""The tokenizer against sentencepiece itself on Meta's model, and trained the paper's way."""

import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.tokenizer import Tokenizer, TokenizerError, train_tokenizer

TRICKY = [
    "Hello world",
    " leading space",
    "   three leading spaces",
    "multiple   inner    spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\nfour",
    "\ttabs\tand\t\ttabs",
    "\r\nwindows line end",
    "12345 and 3.14159 and -0007",
    "year 2023: 1,000,000 tokens",
    "emoji 😀🦙👩‍👩‍👧 flags 🇫🇷",
    "日本語のテキスト、中文文本",
    "Русский текст и українська",
    "العربية والعبرית",
    "combining: e\u0301 vs \u00e9, n\u0303",
    "control \x00 \x01 \x7f bytes",
    "rare \U0010fffd \U0001d49c \u2028 \ufeff",
    "<s> </s> <unk> look like specials",
    "",
    " ",
]


@pytest.fixture(scope="module")
def meta(meta_tokenizer_path):
    return Tokenizer(meta_tokenizer_path), spm.SentencePieceProcessor(
        model_file=str(meta_tokenizer_path)
    )


def test_meta_model_known_ids_and_specials(meta):
    tok, _ = meta
    assert tok.encode("Hello world", bos=False) == [15043, 3186]
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("Hello world", bos=False, eos=True) == [15043, 3186, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, -1, 0)
    assert tok.vocab_size == len(tok) == 32000
    assert tok.id_to_piece(3) == "<0x00>" and tok.is_byte(3)


@pytest.mark.parametrize("text", TRICKY)
def test_meta_ids_equal_sentencepiece_and_roundtrip(meta, text):
    tok, sp = meta
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_meta_digits_are_split(meta):
    tok, _ = meta
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345", bos=False)]
    assert pieces[-5:] == ["1", "2", "3", "4", "5"]


def test_batch_and_padding(meta):
    tok, _ = meta
    texts = TRICKY[:8]
    assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]
    ids = tok.encode("Hello world")
    assert tok.decode(ids + [-1, -1]) == "Hello world"
    assert tok.decode_batch([ids, ids[:2]]) == ["Hello world", "Hello"]


# Meta's model round-trips any text: identity normalisation keeps every character and
# byte fallback covers what the vocabulary lacks. Surrogates are not valid text, so excluded.
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_meta_roundtrip_property(meta, text):
    tok, sp = meta
    ids = tok.encode(text, bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text


def test_serialized_save_and_from_bytes(meta, tmp_path):
    tok, _ = meta
    out = tok.save(tmp_path / "sub" / "copy.model")
    assert out.read_bytes() == Path(tok.path).read_bytes()
    assert Tokenizer.from_bytes(tok.serialized()).encode("abc") == tok.encode("abc")
    assert Tokenizer(out).sha256() == tok.sha256()
    assert [p.name for p in out.parent.iterdir()] == ["copy.model"]


def _stdlib_files(n: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"))[:n]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "code.model"
    return train_tokenizer(_stdlib_files(40), out, vocab_size=800)


def test_trained_tokenizer_is_the_papers_kind(trained):
    assert trained.vocab_size == 800
    assert (trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (0, 1, 2, -1)
    # digits split
    pieces = [trained.id_to_piece(i) for i in trained.encode("x = 2024", bos=False)]
    assert pieces[-4:] == ["2", "0", "2", "4"]
    # byte fallback for characters the corpus never had
    for text in ("snow ☃", "日本", "🦙"):
        ids = trained.encode(text, bos=False)
        assert any(trained.is_byte(i) for i in ids)
        assert trained.decode(ids) == text
    assert trained.unk_id not in trained.encode("☃ 日本 🦙", bos=False)
    # whitespace kept as it is (no normalisation)
    text = "def f(x):\n    return  x\t# two  spaces"
    assert trained.decode(trained.encode(text)) == text


def test_training_from_documents_equals_training_from_files(tmp_path, trained):
    docs = [p.read_text(encoding="utf-8") for p in _stdlib_files(40)]
    from_docs = train_tokenizer(iter(docs), tmp_path / "docs.model", vocab_size=800)
    sample = "import os\nfor i in range(10):\n    print(i)"
    assert from_docs.encode(sample) == trained.encode(sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.model"]  # no temp files


def test_long_lines_are_cut_not_dropped(tmp_path):
    docs = ["word " * 5000] * 3 + ["other text here"] * 50
    tok = train_tokenizer(docs, tmp_path / "t.model", vocab_size=300, max_sentence_length=2048)
    assert tok.piece_to_id("▁word") != tok.unk_id


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="nope.model: tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="bad.model: not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match=r"vocab_size=5000 is more than .*at most \d+"):
        train_tokenizer(["tiny corpus"] * 20, tmp_path / "x.model", vocab_size=5000)
    with pytest.raises(TokenizerError, match="at least 260"):
        train_tokenizer(["tiny corpus"], tmp_path / "x.model", vocab_size=100)
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer(["", "  \n\n "], tmp_path / "x.model", vocab_size=300)
    with pytest.raises(TokenizerError, match="missing.txt: training file not found"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "x.model", vocab_size=300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(TokenizerError, match="latin1.txt: not UTF-8"):
        train_tokenizer(latin1, tmp_path / "x.model", vocab_size=300)
    assert not (tmp_path / "x.model").exists()
