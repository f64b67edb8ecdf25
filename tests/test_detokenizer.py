"""The incremental detokenizer and text follower (inference/detokenizer.py) against full
decoding, on real texts (the shared pretraining samples) in Meta's tokenizer and llama2.c's,
with multi-byte UTF-8, byte fallback and stop strings that span tokens."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from llamaforge.inference.detokenizer import IncrementalDetokenizer, TextFollower
from llamaforge.inference.generate import generate_completions
from llamaforge.tokenizer import Tokenizer, TokenizerError

from .conftest import shared_file, tiny_model

# the shared pretraining samples, each read from its stretch richest in non-ASCII characters
SAMPLES = [
    "pretrain/wiki/wikitext-2/valid.txt",
    "pretrain/qa/beer.stackexchange.com/Posts.xml",
    "pretrain/stories/tinystories/tinystories_val.txt",
    "pretrain/web/cs336/corpus.en",
    "pretrain/latex/hott_book/reals.tex",
]
CHARS = 5000  # characters of each sample (about 1,500 to 3,000 tokens)
MULTILINGUAL = (
    "東京の天気は晴れ。中文测试，日本語とテキスト。 Emoji 🙂🎉👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, "
    "naïve café Ærøskøbing, Привет мир, ελληνικά, עברית, 한국어 텍스트, ẞ\n\t  end 🙂"
)


class CountingTokenizer(Tokenizer):
    """The real tokenizer, recording the most ids one ``decode`` was given."""

    widest = 0

    def decode(self, ids):
        ids = list(ids)
        self.widest = max(self.widest, len(ids))
        return super().decode(ids)


@pytest.fixture(scope="module", params=["meta", "llama2c"])
def tok(request) -> CountingTokenizer:
    if request.param == "meta":
        data = shared_file("tokenizer/llama/tokenizer.model").read_bytes()
    else:
        from llamaforge.checkpoint.convert.llama2c import llama2c_tokenizer_to_sentencepiece

        data = llama2c_tokenizer_to_sentencepiece(shared_file("weights/llama2c/tok512.bin"))
    return CountingTokenizer.from_bytes(data, request.param)


def sample_text(rel: str, chars: int = CHARS) -> str:
    """The ``chars`` characters of a shared sample that hold the most non-ASCII ones."""
    text = shared_file(rel).read_text(encoding="utf-8", errors="replace")
    if len(text) <= chars:
        return text
    marks = [0]
    for c in text:
        marks.append(marks[-1] + (ord(c) > 127))
    best = max(range(0, len(text) - chars, 97), key=lambda i: marks[i + chars] - marks[i])
    return text[best : best + chars]


def reference(tok: Tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> str:
    """Today's definition: the decoding of both minus the prompt's, else the completion's."""
    prefix = tok.decode(prompt)
    full = tok.decode([*prompt, *generated])
    return full[len(prefix) :] if full.startswith(prefix) else tok.decode(generated)


def follow_every_prefix(tok: Tokenizer, prompt: list[int], generated: list[int]) -> None:
    """The incremental text equals full decoding after every token; what is stable never
    changes, and it is the text less at most an incomplete character's U+FFFD."""
    d = IncrementalDetokenizer(tok, prompt)
    assert d.prompt_text == tok.decode(prompt)
    stable = ""
    for i, token in enumerate(generated):
        new = d.add(token)
        want = reference(tok, prompt, generated[: i + 1])
        assert d.text == want, f"after {i + 1} tokens ({generated[max(0, i - 4) : i + 1]})"
        assert d.stable == stable + new and want.startswith(d.stable)
        assert set(d.text[len(d.stable) :]) <= {"\ufffd"}
        stable = d.stable


@pytest.mark.parametrize("rel", SAMPLES)
def test_incremental_text_equals_full_decoding_on_every_prefix(tok, rel):
    ids = tok.encode(sample_text(rel), bos=True)
    assert len(ids) > 1000
    for cut in (1, 2, 9):  # bos alone, bos and one piece, a sentence's start
        follow_every_prefix(tok, ids[:cut], ids[cut:])
    tok.widest = 0
    d = IncrementalDetokenizer(tok, ids[:9])
    for token in ids[9:]:
        d.add(token)
    assert tok.widest <= 12  # never the whole text: the new tokens and a small look-back
    assert d.text == reference(tok, ids[:9], ids[9:])


def test_multibyte_text_and_byte_fallback(tok):
    ids = tok.encode(MULTILINGUAL, bos=False)
    assert any(tok.is_byte(i) for i in ids)  # emoji etc. fall back to bytes in both
    for cut in (0, 1, 3):
        follow_every_prefix(tok, ids[:cut], ids[cut:])
    follow_every_prefix(tok, [tok.bos_id], ids)
    # control pieces at the completion's start keep SentencePiece's leading-space rule
    follow_every_prefix(tok, [tok.bos_id, tok.bos_id], [tok.eos_id, *ids])


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    return [tok.piece_to_id(f"<0x{b:02X}>") for b in data]


def test_incomplete_characters_are_held_back(tok):
    prompt = tok.encode("Smile:", bos=True)
    emoji = byte_ids(tok, "🙂".encode())
    d = IncrementalDetokenizer(tok, prompt)
    for token in emoji[:-1]:
        assert d.add(token) == "" and d.stable == "" and d.text.endswith("\ufffd")
    assert d.add(emoji[-1]) == "🙂" and d.text == "🙂" == reference(tok, prompt, emoji)
    # an invalid byte is final at once; a lead byte cut short by other text too
    generated = byte_ids(tok, b"\xff\xe4\xb8") + tok.encode(" ok", bos=False)
    follow_every_prefix(tok, prompt, generated)
    assert reference(tok, prompt, generated).startswith("\ufffd\ufffd\ufffd")


def test_prompt_ending_inside_a_character(tok):
    # the prompt's last bytes are half of 中 (E4 B8 AD): as before, the completion that
    # finishes the character is then decoded on its own; one that does not, after the prompt
    prompt = [tok.bos_id, *tok.encode("x", bos=False), *byte_ids(tok, b"\xe4\xb8")]
    follow_every_prefix(tok, prompt, [*byte_ids(tok, b"\xad"), *tok.encode(" yes", bos=False)])
    follow_every_prefix(tok, prompt, tok.encode(" no", bos=False))
    follow_every_prefix(tok, byte_ids(tok, b"\xf0"), byte_ids(tok, b"\x9f\x99\x82\xf0\x9f"))


def collect(follower: TextFollower, ids: Sequence[int]) -> tuple[list[str], int]:
    """Add ``ids`` until a stop string; every delta, and how many ids were taken."""
    deltas = []
    for n, token in enumerate(ids, 1):
        stopped = follower.add(token)
        deltas.append(follower.delta(final=stopped))
        if stopped:
            return deltas, n
    deltas.append(follower.delta(final=True))
    return deltas, len(ids)


def test_stop_string_spanning_tokens(tok):
    text = "Once upon a time, the little fox said: the end of it, and then more words came."
    prompt, ids = [tok.bos_id], tok.encode(text, bos=False)
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # a stop string from the middle of one token to the middle of a later one
    at = next(i for i in range(2, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) > 2)
    start = len(pieces[at - 1]) - 2
    stop = text[start : len(pieces[at]) + 1]
    assert text.find(stop) == start
    f = TextFollower(tok, prompt, ["never there", stop])
    deltas, taken = collect(f, ids)
    assert taken == at + 2 and f.stopped and f.text == text[:start]
    assert "".join(deltas) == f.text  # the stop string's start was held back, never streamed
    for i in range(1, len(deltas)):
        assert text.startswith("".join(deltas[:i]))


def test_deltas_add_up_on_real_text_with_stops(tok):
    text = sample_text(SAMPLES[1], 3000) + "\n" + MULTILINGUAL
    ids = tok.encode(text, bos=False)
    final = reference(tok, [tok.bos_id], ids)
    f = TextFollower(tok, [tok.bos_id], ["NEVER-IN-IT", "\ufffd\ufffd\ufffd\ufffd\ufffd"])
    deltas, _ = collect(f, ids)
    assert "".join(deltas) == f.text == final and not f.stopped
    streamed = ""
    for d in deltas:
        streamed += d
        assert final.startswith(streamed)


def test_stop_at_the_very_first_token(tok):
    ids = tok.encode("Hello world", bos=False)
    first = reference(tok, [tok.bos_id], ids[:1])
    f = TextFollower(tok, [tok.bos_id], [first[-2:]])
    assert f.add(ids[0]) and f.text == first[:-2] and f.delta() == first[:-2]
    with pytest.raises(RuntimeError, match="after the stop string"):
        f.add(ids[1])
    g = TextFollower(tok, [tok.bos_id], [""])  # an empty stop string stops at once, as before
    assert g.add(ids[0]) and g.text == ""


def test_bad_input(tok):
    with pytest.raises(TokenizerError, match=rf"cannot decode ids \[{tok.vocab_size}\]"):
        IncrementalDetokenizer(tok, [tok.bos_id]).add(tok.vocab_size)
    with pytest.raises(TypeError, match="stop must be a sequence of strings"):
        TextFollower(tok, [tok.bos_id], "end")
    d = IncrementalDetokenizer(tok, [tok.bos_id, -1])  # padding is dropped, as decode does
    d.add(-1)
    d.add(tok.encode("Hi", bos=False)[0])
    assert d.text == tok.decode([tok.bos_id, *tok.encode("Hi", bos=False)[:1]])


def test_generate_streams_exactly_the_text_cut_at_a_spanning_stop(small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, output_scale=25.0)
    kw = dict(max_new_tokens=40, temperature=0.0, stop_at_eos=False)
    free = generate_completions(model, small_tokenizer, ["The"], **kw)[0]
    prompt = small_tokenizer.encode("The")
    texts = [reference(small_tokenizer, prompt, free.tokens[:n]) for n in range(41)]
    # a stop string across a token boundary, first found there
    ends = [len(t) for t in texts]
    cut = next(
        e
        for e in ends[2:]
        if 0 < e < len(free.text) and free.text.find(free.text[e - 1 : e + 1]) == e - 1
    )
    stop = free.text[cut - 1 : cut + 1]
    streamed: list[str] = []
    got = generate_completions(
        model, small_tokenizer, ["The"], stop=[stop], on_text=lambda i, d: streamed.append(d), **kw
    )[0]
    assert got.finish_reason == "stop" and got.text == free.text[: cut - 1]
    assert "".join(streamed) == got.text
