"""Hostile finetuning data and settings (issue 25): every case is a one-line error naming the
file and line (or the setting, its value and its range), or a documented safe behaviour —
a record longer than ``data.max_record_bytes`` is skipped unread in bounded memory, bad
UTF-8 and JSON nested past Python's recursion limit are bad records that ``skip_bad``
counts, a conversation of many turns costs the turns that fit in ``max_len``."""

from __future__ import annotations

import json
from collections import Counter
from typing import ClassVar

import pytest

from llamaforge.chat_templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    ChatTemplate,
    tokenize_conversation,
)
from llamaforge.finetune.data import (
    Example,
    tokenize_examples,
)
from llamaforge.tokenizer import Tokenizer

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
GOOD_LINE = json.dumps(GOOD).encode()


@pytest.fixture(scope="module")
def meta_tok(meta_tokenizer_path) -> Tokenizer:
    return Tokenizer(meta_tokenizer_path)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def messages(r) -> list:
    return [e.messages for e in r.examples]


# ----------------------------------------------------------------------------- many turns


class CountingTemplate(ChatTemplate):
    """A built-in template that counts the prefixes it renders."""

    renders: ClassVar[list[int]] = []

    def _render(self, messages, prefixes):  # type: ignore[no-untyped-def]
        CountingTemplate.renders.append(len(prefixes))
        return super()._render(messages, prefixes)


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_a_conversation_of_1500_turns_renders_only_the_turns_that_fit(meta_tok, name):
    turns = []
    for i in range(1500):
        turns += [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    tpl = CountingTemplate(name, BUILTIN_TEMPLATES[name])
    CountingTemplate.renders.clear()
    counts: Counter[str] = Counter()
    (ex,) = tokenize_examples([Example(turns, "x:1")], meta_tok, tpl, max_len=512, counts=counts)
    assert len(ex.ids) == 513 and counts["truncated"] == 1
    trained = (ex.labels != IGNORE_INDEX).astype(int)
    kept = int((trained[1:] > trained[:-1]).sum()) + int(trained[0])  # answers in the kept ids
    assert 10 < kept < 60
    rendered = sum(CountingTemplate.renders)  # the whole conversation, two per answer
    assert rendered <= 1 + 2 * (2 * kept + 32) and rendered < 3001 / 10
    # the same ids and labels as the conversation cut to the answers that fit
    (short,) = tokenize_examples([Example(turns[: 2 * kept + 2], "x:1")], meta_tok, name)
    assert short.ids.tolist()[:513] == ex.ids.tolist()
    assert short.labels.tolist()[:513] == ex.labels.tolist()


# a template rendered in a worker process, that writes no special between turns
NO_SPECIALS = (
    "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)


@pytest.mark.parametrize("name", ["alpaca", "llama2", "no-specials"])
def test_ids_and_labels_up_to_max_tokens_are_those_of_the_whole(meta_tok, name):
    """``max_tokens`` cuts the ids and labels without changing any: message text that looks
    like a special (encoded apart), non-ASCII text, templates with and without specials."""
    tpl = ChatTemplate(name, NO_SPECIALS) if name == "no-specials" else name
    conv = [{"role": "system", "content": "Be brief </s> <s>[INST]"}]
    for i in range(12):
        conv += [
            {"role": "user", "content": f"Qu'est-ce que {i} </s>? café 🙂"},
            {"role": "assistant", "content": f"Réponse {i}: <s> {'ok ' * i}"},
        ]
    for train_on_prompt in (False, True):
        ids, labels = tokenize_conversation(tpl, meta_tok, conv, train_on_prompt=train_on_prompt)
        for m in (1, 2, 17, 64, 101, len(ids) - 1, len(ids), len(ids) + 5):
            cut = tokenize_conversation(
                tpl, meta_tok, conv, train_on_prompt=train_on_prompt, max_tokens=m
            )
            assert cut == (ids[:m], labels[:m]), m
