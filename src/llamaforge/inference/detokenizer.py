"""Text of a completion as its tokens arrive, at a cost per token that does not grow.

A completion's text is what decoding the prompt and the completion together adds to the
prompt's own text (``completion_text``): decoding the completion alone would drop the
leading space of its first piece, which SentencePiece strips from the first piece of a text.

`IncrementalDetokenizer` keeps that text up to date one token at a time. Each step decodes
only a small window: the tokens since the last *commit point* and a few committed ones before
it (at most about 12 ids), and the text they add is the window's text minus the text of the
window without them (the offsets of vLLM's detokenizer and Hugging Face's ``TextStreamer``).
That difference equals the full decoding's because SentencePiece decodes piece by piece,
except that

* it strips the leading space of the first piece that is not a control piece (``<s>``,
  ``</s>``): the committed part of a window therefore always holds such a piece, unless
  nothing but control pieces come before the window;
* runs of byte-fallback pieces (``<0xE4>``) are decoded together as UTF-8, each byte of an
  incomplete or invalid sequence as U+FFFD: a commit point is never inside a character that
  later bytes may complete (at most the last 3 tokens are held back as *pending*).

`TextFollower` adds stop strings, searched for only in the text that changed (plus the
longest stop string's length before it), and ``delta``: the new text that is safe to stream,
without an incomplete character or a tail that may become a stop string, so the deltas add
up exactly to the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

from llamaforge.tokenizer import Tokenizer, TokenizerError

__all__ = ["IncrementalDetokenizer", "TextFollower", "completion_text"]

# prompt tokens decoded before the completion's first one (more when they are control pieces
# or continuation bytes): enough for SentencePiece's leading-space rule and a split character
_LOOK_BACK = 4
# ids a window may grow to before it moves on (which costs one more decoding)
_WINDOW = 8


def completion_text(
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    generated: Sequence[int],
    prompt_text: str | None = None,
) -> str:
    """The text ``generated`` adds after ``prompt``, decoded at once: the decoding of both
    minus the prompt's text (``prompt_text``, decoded here when not given). When the prompt
    ends inside a character that ``generated`` completes, the decoding of both does not
    start with the prompt's text, and the completion is decoded on its own."""
    if prompt_text is None:
        prompt_text = tokenizer.decode(prompt)
    full = tokenizer.decode([*prompt, *generated])
    if full.startswith(prompt_text):
        return full[len(prompt_text) :]
    return tokenizer.decode(generated)


class IncrementalDetokenizer:
    """``completion_text`` of a prompt and the tokens ``add``-ed so far, kept up to date by
    decoding a few tokens per step.

    ``text`` is the completion's text; ``stable`` the part of it that later tokens cannot
    change (``text`` minus the U+FFFD of an incomplete UTF-8 sequence at its end);
    ``prompt_text`` the prompt's decoding. Negative ids are ignored (as ``decode`` drops
    them); an id outside the vocabulary is a TokenizerError."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self._ids = [int(t) for t in prompt if int(t) >= 0]
        _check_ids(tokenizer, self._ids)
        self.prompt_text = tokenizer.decode(self._ids)
        self._n_prompt = len(self._ids)
        self._start = self._window_start()  # window: ids[_start:], committed up to _read
        self._read = self._n_prompt
        self._window_text = tokenizer.decode(self._ids[self._start :])
        self._stable = ""  # text of ids[_n_prompt:_read]
        self._pending = ""  # text of ids[_read:]: an incomplete character's U+FFFD

    @property
    def text(self) -> str:
        return self._stable + self._pending

    @property
    def stable(self) -> str:
        return self._stable

    def text_since(self, start: int) -> str:
        """``text[start:]``, without building the whole text."""
        return self._stable[start:] + self._pending

    def add(self, token: int) -> str:
        """Take the next token; returns the text that became stable (often "", while a
        character's bytes arrive)."""
        token = int(token)
        if token < 0:
            return ""
        _check_ids(self.tokenizer, [token])
        self._ids.append(token)
        commit = len(self._ids) - self._incomplete_tail()
        new = ""
        if commit > self._read:
            new = self._commit(commit)
        if commit < len(self._ids):
            self._pending = self._window_delta(self._decode_window(len(self._ids)))
        else:
            self._pending = ""
        return new

    def _commit(self, end: int) -> str:
        """Make the text of ``ids[_read:end]`` stable (``end`` is a character boundary) and
        move the window on; returns that text."""
        ids, decode = self._ids, self.tokenizer.decode
        window = self._decode_window(end)
        if window.startswith(self._window_text):
            new = window[len(self._window_text) :]
        elif self._read == self._n_prompt and not self._stable:
            # the completion finished the prompt's last character: today's rule
            # (completion_text) decodes the completion on its own from here on
            self._start = self._n_prompt
            new = decode(ids[self._n_prompt : end])
            self._read, self._window_text = end, new
            self._stable = new
            return new
        else:  # not seen with SentencePiece: decode from the start (exact, not incremental)
            if self._start == 0:
                raise TokenizerError(
                    f"{self.tokenizer!r}: decoding {len(ids)} ids is not a continuation of "
                    "decoding the ids before them; this tokenizer cannot be followed"
                )
            self._start = 0
            self._window_text = decode(ids[: self._read])
            return self._commit(end)
        self._stable += new
        if end - self._start > _WINDOW and any(
            not self.tokenizer.is_control(t) for t in ids[self._read : end]
        ):
            # the chunk just committed starts the next window: it holds a non-control piece
            self._start = self._read
            self._window_text = decode(ids[self._start : end])
        else:
            self._window_text = window
        self._read = end
        return new

    def _decode_window(self, end: int) -> str:
        return self.tokenizer.decode(self._ids[self._start : end])

    def _window_delta(self, window: str) -> str:
        """The completion's text in ``window`` (a decoding from ``_start``) after ``_read``."""
        if window.startswith(self._window_text):
            return window[len(self._window_text) :]
        # the prompt ends inside a character these bytes complete (see completion_text)
        return self.tokenizer.decode(self._ids[self._n_prompt :])

    def _window_start(self) -> int:
        """Where the first window starts in the prompt: a few tokens back, at a character
        boundary, with a non-control piece in it unless every prompt token before it is a
        control piece."""
        ids, tok = self._ids, self.tokenizer
        last = next((i for i in range(len(ids) - 1, -1, -1) if not tok.is_control(ids[i])), None)
        if last is None:  # nothing but control pieces: the completion's first piece is first
            return len(ids)
        start = max(0, min(last, len(ids) - _LOOK_BACK))
        while start > 0 and _is_continuation(tok, ids[start]):
            start -= 1
        return start

    def _incomplete_tail(self) -> int:
        """How many of the last ids are the bytes of a character that later bytes may still
        complete: a UTF-8 lead byte and the continuation bytes after it, fewer than the
        lead announces (0 to 3)."""
        ids, tok = self._ids, self.tokenizer
        for back in range(1, min(3, len(ids)) + 1):
            byte = _byte_value(tok, ids[-back])
            if byte is None:
                return 0
            if byte & 0xC0 != 0x80:  # ASCII or a lead byte: a character starts here
                return back if _utf8_length(byte) > back else 0
        return 0


def _check_ids(tokenizer: Tokenizer, ids: Sequence[int]) -> None:
    too_big = [i for i in ids if i >= tokenizer.vocab_size]
    if too_big:
        raise TokenizerError(
            f"cannot decode ids {too_big[:5]}: the vocabulary has ids 0..{tokenizer.vocab_size - 1}"
        )


def _byte_value(tokenizer: Tokenizer, token: int) -> int | None:
    """The byte of a byte-fallback piece (``<0xE4>``: 0xE4), None for any other piece."""
    if not tokenizer.is_byte(token):
        return None
    return int(tokenizer.id_to_piece(token)[3:-1], 16)


def _is_continuation(tokenizer: Tokenizer, token: int) -> bool:
    byte = _byte_value(tokenizer, token)
    return byte is not None and byte & 0xC0 == 0x80


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence that ``lead`` starts (1 for ASCII and invalid leads)."""
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 1


class TextFollower:
    """A completion's text as its tokens arrive, cut at the first of the ``stop`` strings.

    ``add(token)`` returns True when a stop string has completed (``text`` is then cut
    before it, and no more tokens may be added); ``delta(final)`` is the text not handed out
    yet that is safe to stream: without an incomplete UTF-8 sequence or a tail that may
    become a stop string, unless ``final``. eos and length limits are the caller's."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int], stop: Sequence[str] = ()):
        if isinstance(stop, str):
            raise TypeError(f"stop must be a sequence of strings, got the string {stop!r}")
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        self.stop = tuple(stop)
        self._reach = max((len(s) for s in self.stop), default=0)
        self.stopped = False
        self._cut = ""  # the text before the stop string, once stopped
        self._emitted = 0

    @property
    def prompt_text(self) -> str:
        return self.detokenizer.prompt_text

    @property
    def text(self) -> str:
        return self._cut if self.stopped else self.detokenizer.text

    def add(self, token: int) -> bool:
        """Take the next token; True when it completed a stop string."""
        if self.stopped:
            raise RuntimeError(f"token {token} added after the stop string {self.stop!r} ended")
        old = len(self.detokenizer.stable)
        self.detokenizer.add(token)
        if not self.stop:
            return False
        # a stop string wholly in the old stable text would have been found before
        start = max(0, old - max(self._reach - 1, 0))
        tail = self.detokenizer.text_since(start)
        hits = [i for i in (tail.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self._cut = self.detokenizer.stable[:start] + tail[: min(hits)]
        self.stopped = True
        return True

    def delta(self, final: bool = False) -> str:
        """The text since the last call that is safe to stream (all of it when ``final``)."""
        if final or self.stopped:
            text = self.text
            end = len(text)
        else:
            text = self.detokenizer.stable
            end = len(text) - max((_held(text, s) for s in self.stop), default=0)
        if end <= self._emitted:
            return ""
        out = text[self._emitted : end]
        self._emitted = end
        return out


def _held(text: str, stop: str) -> int:
    """How many characters at the end of ``text`` are the start of ``stop`` (not all of it)."""
    tail = text[len(text) - len(stop) + 1 :] if len(stop) > 1 else ""
    i = tail.find(stop[0]) if tail else -1
    while i >= 0:
        if stop.startswith(tail[i:]):
            return len(tail) - i
        i = tail.find(stop[0], i + 1)
    return 0
