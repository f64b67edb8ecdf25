"""Source kinds web (CCNet / C4), code (GitHub) and generic, on the shared real files and small
inline cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llamaforge.data.base import DataError, FilterStats
from llamaforge.data.code import classify_license, read_code, strip_license_header
from llamaforge.data.generic import read_generic
from llamaforge.data.web import (
    html_to_text,
    identify_language,
    normalize_line,
    read_web,
    reference_model,
)

from .conftest import shared_file

GOOD = (
    "The city is located on the northern bank of the river, about forty kilometres from the "
    "coast. It was founded in the twelfth century as a small trading post, and it grew "
    "rapidly during the following decades.\n"
    "Today it is known for its historic cathedral and for the university, which was "
    "established in 1450. The population of the city was estimated at about 200,000 people "
    "in 2010."
)
SALAD = (
    "decades post river century the small it was established people coast bank and from "
    "city northern the of cathedral grew founded in kilometres university today historic "
    "about the which population estimated following known rapidly trading located twelfth"
)
BOILER = (
    "Home | About us | Contact | Login | Register\n"
    "Copyright 2020 ACME Inc. All rights reserved.\n"
    "Click here to subscribe to our newsletter!!!\n"
    "Buy cheap viagra online best price free shipping\n"
    "Share on Facebook Twitter Pinterest"
)


def run(fn, paths, options=None):
    stats = FilterStats()
    docs = list(fn([Path(p) for p in paths], options or {}, stats))
    return docs, stats


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wiki_valid() -> Path:
    return shared_file("pretrain/wiki/wikitext-2/valid.txt")


# ----------------------------------------------------------------------------- web: HTML


def test_real_html_pages_lose_navigation_keep_article():
    ch01 = shared_file("pretrain/web/html_debian_reference/ch01.en.html")
    ch02 = shared_file("pretrain/web/html_debian_reference/ch02.en.html")
    text = html_to_text(ch01.read_text(encoding="utf-8"))
    # article text stays
    assert "I think learning a computer system is like learning a new foreign language." in text
    assert "1.1.1. The shell prompt" in text
    # the table of contents (div.toc) and the navigation footer (div.navfooter) are gone
    assert "Table of Contents" not in text
    assert "Chapter 2. Debian package management" not in text  # only in div.navfooter
    assert "Preface" not in text  # navfooter's "previous" link text
    assert "<" + "p>" not in text and "class=" not in text
    text2 = html_to_text(ch02.read_text(encoding="utf-8"))
    # the title is the <h1>; the navheader's copy of it and <head><title> are dropped
    assert text2.count("Chapter 2. Debian package management") == 1
    assert "Table of Contents" not in text2
    docs, stats = run(read_web, [ch01, ch02], {"quality": "none"})
    assert len(docs) == 2 and stats.documents_in == 2 and stats.documents_out == 2
    assert stats.bytes_out < stats.bytes_in
    assert not stats.errors


def test_inline_html_boilerplate_removed():
    html = """<html><head><title>T</title><style>body{color:red}</style></head><body>
    <header>Site Header Links</header><nav><a>NavHome</a></nav>
    <div class="main-menu"><a>MenuItem</a></div><div id="cookie-banner">We use cookies</div>
    <div class="sidebar-left">SidebarText</div><script>var tracking = 1;</script>
    <noscript>Enable JS</noscript><form><label>Search box</label></form>
    <article><h1>Real Title</h1><p>First paragraph of the article.<p>Second paragraph
    with    extra   spaces.</p><ul><li>item one</li><li>item two</li></ul></article>
    <aside>Aside text</aside><footer>Footer text</footer>
    <div class="unavailable-note">Not navigation.</div></body></html>"""
    text = html_to_text(html)
    assert text.split("\n") == [
        "Real Title",
        "First paragraph of the article.",
        "Second paragraph with extra spaces.",
        "item one",
        "item two",
        "Not navigation.",
    ]


# ----------------------------------------------------------------------------- web: dedup, langid


def test_line_dedup_across_documents(tmp_path):
    shared = "This shared line appears in both documents, 2019 edition."
    a = write(tmp_path / "a.txt", f"Alpha unique opening sentence here.\n{shared}\n")
    b = write(tmp_path / "b.txt", "THIS shared line appears in both documents 2020 edition!\nBeta.")
    docs, stats = run(read_web, [a, b], {"quality": "none", "languages": []})
    assert docs == [f"Alpha unique opening sentence here.\n{shared}", "Beta."]
    assert stats.removed["duplicate_line"] == 1
    assert normalize_line("  Hello,   World 42!") == "hello world 00"
    docs, stats = run(read_web, [a, b], {"quality": "none", "languages": [], "dedup_lines": False})
    assert len(docs[1].split("\n")) == 2 and "duplicate_line" not in stats.removed


def test_line_dedup_counts_every_repeat_within_and_across_documents(tmp_path):
    a = write(
        tmp_path / "a.txt",
        "The first line of the first page.\n"
        "A repeated line, seen 3 times.\n"
        "a REPEATED line seen 4 times!\n"  # same normalised form: removed
        "---\n"  # punctuation only: no identity, kept
        "---\n"
        "The last line of the first page.\n",
    )
    b = write(
        tmp_path / "b.txt",
        "A repeated line, seen 5 times.\n"  # seen in a.txt: removed
        "The first line of the first page.\n"  # removed
        "Only in the second page.\n",
    )
    docs, stats = run(read_web, [a, b], {"quality": "none", "languages": []})
    assert docs == [
        "The first line of the first page.\nA repeated line, seen 3 times.\n---\n---\n"
        "The last line of the first page.",
        "Only in the second page.",
    ]
    assert stats.removed["duplicate_line"] == 3


def test_langid_keeps_english_drops_french_and_german(tmp_path):
    en = write(tmp_path / "en.html", f"<html><body><p>{GOOD}</p></body></html>")
    fr = write(
        tmp_path / "fr.html",
        "<p>La ville est située sur la rive nord du fleuve, à environ quarante kilomètres de "
        "la côte. Elle a été fondée au douzième siècle comme un petit comptoir commercial.</p>",
    )
    de = write(
        tmp_path / "de.html",
        "<p>Die Stadt liegt am nördlichen Ufer des Flusses, etwa vierzig Kilometer von der "
        "Küste entfernt. Sie wurde im zwölften Jahrhundert als kleiner Handelsposten "
        "gegründet.</p>",
    )
    docs, stats = run(read_web, [de, en, fr], {"quality": "none"})
    assert docs == [GOOD.replace("\n", " ")]  # whitespace inside <p> collapses
    assert stats.removed["language"] == 2
    docs, _ = run(read_web, [de, en, fr], {"quality": "none", "languages": ["fr", "de"]})
    assert len(docs) == 2 and docs[0].startswith("Die Stadt")


def test_real_web_text_sample_is_english():
    corpus = shared_file("pretrain/web/cs336/corpus.en")
    docs, stats = run(read_web, [corpus], {"quality": "none"})
    assert len(docs) == 1 and stats.documents_in == 1  # no blank lines: one document
    assert "language" not in stats.removed and not stats.errors  # kept as English
    assert identify_language(docs[0])[0] == "en"
    # the exact number of repeated lines (by normalised form) in the file
    seen: set[str] = set()
    repeats = 0
    for line in corpus.read_text(encoding="utf-8").split("\n"):
        norm = normalize_line(line)
        repeats += bool(norm) and norm in seen
        seen.add(norm)
    assert repeats > 0 and stats.removed["duplicate_line"] == repeats
    docs, stats = run(read_web, [corpus], {"quality": "none", "txt_split": "line", "languages": []})
    assert stats.documents_in > 1000 and len(docs) > 800


# ----------------------------------------------------------------------------- web: C4


C4_GOOD = (
    "The museum opened in 1902 and holds a large collection of paintings.\n"
    "Its first director was a well-known local historian.\n"
    "Visitors can see works from the medieval period to the present day.\n"
    "The building itself was designed by a famous architect.\n"
    "Admission is free on the first Sunday of every month!\n"
)


def test_c4_heuristics(tmp_path):
    good = write(
        tmp_path / "1good.txt",
        C4_GOOD
        + "Menu\n"  # no terminal punctuation
        + "Read more.\n"  # fewer than 3 words
        + "Please enable JavaScript to view the comments.\n"
        + "By using this site you agree to our Terms of Use.\n",
    )
    lorem = write(tmp_path / "2lorem.txt", C4_GOOD.replace("museum", "Lorem Ipsum museum"))
    brace = write(tmp_path / "3brace.txt", C4_GOOD + "The code is function() { return 1; }.\n")
    few = write(tmp_path / "4few.txt", "Only two sentences are here. That is too few!\n")
    opts = {"quality": "c4", "languages": [], "txt_split": "file"}
    docs, stats = run(read_web, [good, lorem, brace, few], opts)
    assert docs == [C4_GOOD.strip()]
    r = stats.removed
    assert r["c4_line_no_terminal_punct"] == 1 and r["c4_line_short"] == 1
    assert r["c4_line_javascript"] == 1 and r["c4_line_policy"] == 1
    assert r["c4_lorem_ipsum"] == 1 and r["c4_curly_brace"] == 1 and r["c4_few_sentences"] == 1
    assert stats.documents_in == 4 and stats.documents_out == 1


# ----------------------------------------------------------------------------- web: CCNet


def test_ngram_perplexity_ranks_fluent_below_garbage(wiki_valid):
    ref = reference_model([wiki_valid])
    good, salad, boiler = (ref.lm.perplexity(t) for t in (GOOD, SALAD, BOILER))
    assert good < salad / 3 and good < boiler / 3
    threshold = ref.perplexity_threshold(0.95, 1.5)
    assert good < threshold < min(salad, boiler)
    held = sorted(ref.heldout_perplexities)
    assert len(held) > 100 and held[len(held) // 2] < threshold


def test_ccnet_keeps_good_drops_garbage(tmp_path, wiki_valid):
    corpus = shared_file("pretrain/web/cs336/corpus.en")
    files = [
        write(tmp_path / "a.txt", GOOD),
        write(tmp_path / "b.txt", SALAD),
        write(tmp_path / "c.txt", BOILER),
    ]
    base = {
        "reference_paths": [str(wiki_valid)],
        "txt_split": "file",
        "negative_paths": [str(corpus)],  # real random web sentences as negatives
        "negative_split": "line",
    }
    docs, stats = run(read_web, files, base)
    assert docs == [GOOD]
    assert stats.removed["perplexity"] == 2 and "classifier" not in stats.removed
    # the classifier alone (perplexity filter off) also rejects the boilerplate page
    docs, stats = run(read_web, files, {**base, "max_perplexity": 1e12})
    assert GOOD in docs and BOILER not in docs
    assert stats.removed["classifier"] >= 1 and "perplexity" not in stats.removed


def test_ccnet_needs_reference(tmp_path):
    f = write(tmp_path / "a.txt", GOOD)
    with pytest.raises(DataError, match="reference_paths"):
        run(read_web, [f], {})


# ----------------------------------------------------------------------------- code

MIT = (
    "MIT License\n\nCopyright (c) 2020 Someone\n\nPermission is hereby granted, free of "
    "charge, to any person obtaining a copy of this software...\n"
)
GPL = (
    "                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, "
    "29 June 2007\n\n Copyright (C) 2007 Free Software Foundation, Inc.\n"
)
BODY = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


def test_code_license_filter(tmp_path):
    mit = write(tmp_path / "mitrepo/pkg/mod.py", BODY)
    write(tmp_path / "mitrepo/LICENSE", MIT)
    gpl = write(tmp_path / "gplrepo/src/deep/mod.py", BODY.replace("add", "sub"))
    write(tmp_path / "gplrepo/COPYING", GPL)
    spdx = write(
        tmp_path / "norepo/a.py", "# SPDX-License-Identifier: GPL-2.0-or-later\nx = 1\n" * 1
    )
    spdx_ok = write(
        tmp_path / "norepo/b.py", "# SPDX-License-Identifier: Apache-2.0 OR GPL-2.0\ny = 2\n"
    )
    docs, stats = run(read_code, [mit, gpl, spdx, spdx_ok])
    assert docs == [BODY, "y = 2\n"]
    assert stats.removed["license:gpl"] == 2
    # unknown license: kept by default, dropped on request
    unknown = write(tmp_path / "norepo/c.py", "z = 3\n")
    docs, stats = run(read_code, [unknown], {"repo_depth": 0})
    assert docs == ["z = 3\n"]
    docs, stats = run(read_code, [unknown], {"repo_depth": 0, "unknown_license": "drop"})
    assert docs == [] and stats.removed["license:unknown"] == 1
    # allowing the GPL keeps it
    docs, _ = run(read_code, [gpl], {"licenses": ["gpl"]})
    assert len(docs) == 1
    assert classify_license("GNU LESSER GENERAL PUBLIC LICENSE") == "lgpl"
    assert classify_license("Apache License, Version 2.0") == "apache"
    assert classify_license("Redistribution and use in source and binary forms") == "bsd"


def test_code_header_quality_and_dedup(tmp_path):
    write(tmp_path / "repo/LICENSE", MIT)
    header = (
        "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n# Copyright (c) 2020 Someone\n"
        "# Licensed under the MIT License; see LICENSE.\n\n"
    )
    stripped, removed = strip_license_header(header + BODY)
    assert removed and "Copyright" not in stripped and stripped.startswith("#!/usr/bin/env")
    assert strip_license_header("# just a comment\nx = 1\n") == ("# just a comment\nx = 1\n", False)
    c_header = "/*\n * Copyright 2021 X\n * Licensed under the Apache License\n */\nint x;\n"
    assert strip_license_header(c_header) == ("int x;\n", True)
    files = [
        write(tmp_path / "repo/a.py", header.split("\n", 2)[2] + BODY),
        write(tmp_path / "repo/b.py", BODY),  # duplicate of a.py once its header is removed
        write(tmp_path / "repo/minified.py", "x=[" + ",".join(["1"] * 800) + "]\n"),
        write(tmp_path / "repo/wide.py", ("y = '" + "abc " * 40 + "'\n") * 5),
        write(tmp_path / "repo/symbols.py", "#" * 60 + "\n" + "# -- == ++ ** //\n" * 20),
        write(tmp_path / "repo/data.txt", "not python"),
    ]
    docs, stats = run(read_code, files)
    assert len(docs) == 1 and "Copyright" not in docs[0] and docs[0].endswith(BODY)
    r = stats.removed
    assert r["license_header"] == 1 and r["duplicate_file"] == 1
    assert r["max_line_length"] == 1 and r["mean_line_length"] == 1
    assert r["alnum_fraction"] == 1
    assert stats.documents_in == 5  # data.txt is not a selected extension


def test_code_stdlib_sample_all_psf():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:50]
    assert len(files) == 50
    docs, stats = run(read_code, files, {"unknown_license": "drop"})  # all must be known: PSF
    assert len(docs) == 50 and all(d.strip() for d in docs)
    assert not any(k.startswith("license:") for k in stats.removed)
    assert not stats.errors and stats.documents_out == 50
    # without PSF in the allowed list, the stdlib is excluded by its LICENSE file
    docs, stats = run(read_code, files[:5], {"licenses": ["mit", "bsd", "apache"]})
    assert docs == [] and stats.removed["license:psf"] == 5


# ----------------------------------------------------------------------------- generic


def test_generic_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = write(tmp_path / "a.txt", "First paragraph.\n\n\nSecond paragraph.\n")
    jl = write(
        tmp_path / "b.jsonl",
        '{"text": "json one"}\n{"text": "json two", "id": 2}\n{bad json\n\n{"text": "  "}\n',
    )
    arr = write(tmp_path / "c.json", json.dumps([{"body": "array doc"}]))
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(2500)]}), pq_path)
    docs, stats = run(read_generic, [txt, jl, pq_path])
    assert docs[:3] == ["First paragraph.\n\n\nSecond paragraph.", "json one", "json two"]
    assert docs[3:] == [f"row {i}" for i in range(2500)]
    assert stats.removed["bad_json_line"] == 1 and stats.removed["empty"] == 1
    assert stats.errors == [
        f"{jl}:3: malformed JSON (Expecting property name enclosed in double quotes)"
    ]
    docs, _ = run(read_generic, [txt], {"split": "paragraph"})
    assert docs == ["First paragraph.", "Second paragraph."]
    docs, stats = run(read_generic, [arr], {"text_field": "body"})
    assert docs == ["array doc"]


def test_generic_hf_datasets_local(tmp_path):
    datasets = pytest.importorskip("datasets")
    jl = write(tmp_path / "x.jsonl", '{"text": "hf one"}\n{"text": "hf two"}\n')
    cache = str(tmp_path / "cache")
    docs, stats = run(read_generic, [jl], {"loader": "datasets", "hf_cache_dir": cache})
    assert docs == ["hf one", "hf two"] and not stats.errors
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["saved a", "saved b"]}).save_to_disk(str(saved))
    files = sorted(p for p in saved.rglob("*") if p.is_file())
    docs, stats = run(read_generic, files)
    assert docs == ["saved a", "saved b"] and not stats.errors


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [read_web, read_code, read_generic])
def test_bad_files_reported_and_others_go_on(tmp_path, fn):
    ext = ".py" if fn is read_code else ".txt"
    good_text = C4_GOOD if fn is not read_code else BODY
    good = write(tmp_path / f"good{ext}", good_text)
    binary = write(tmp_path / f"binary{ext}", b"\x7fELF\x00\x00\x01\x02" * 10)
    latin1 = write(tmp_path / f"latin1{ext}", "caf\u00e9 = 1\n".encode("latin-1"))
    empty = write(tmp_path / f"empty{ext}", "")
    opts = {"quality": "none"} if fn is read_web else {}
    docs, stats = run(fn, [binary, latin1, empty, good], opts)
    assert docs == [good_text.strip() + ("\n" if fn is read_code else "")]
    joined = "\n".join(stats.errors)
    assert str(binary) in joined and "binary" in joined
    assert str(latin1) in joined and "UTF-8" in joined
    if fn is read_code:
        assert stats.removed["empty"] == 1  # an empty module is a (dropped) empty document
    else:
        assert str(empty) in joined and "empty" in joined


@pytest.mark.parametrize("fn", [read_web, read_generic])
def test_missing_text_field_reported(tmp_path, fn):
    f = write(tmp_path / "m.jsonl", '{"content": "no text field"}\n' + json.dumps({"text": GOOD}))
    opts = {"quality": "none"} if fn is read_web else {}
    docs, stats = run(fn, [f], opts)
    assert docs == [GOOD]
    assert len(stats.errors) == 1 and f"{f}:1" in stats.errors[0] and "'text'" in stats.errors[0]


@pytest.mark.parametrize(
    ("fn", "options", "needle"),
    [
        (read_web, {"qualty": "c4"}, "'qualty'"),
        (read_web, {"quality": "best"}, r"web\.quality: 'best' is not one of .*'c4'"),
        (read_web, {"quality": "none", "min_lang_score": "high"}, r"web\.min_lang_score"),
        (read_code, {"licence": ["mit"]}, "'licence'"),
        (read_code, {"max_line_length": "long"}, r"code\.max_line_length: expected int"),
        (read_generic, {"split": "sentence"}, r"generic\.split: 'sentence'"),
        (read_generic, {"textfield": "x"}, "'textfield'"),
    ],
)
def test_bad_options(tmp_path, fn, options, needle):
    f = write(tmp_path / "a.txt", "x")
    with pytest.raises(DataError, match=needle):
        run(fn, [f], options)


def test_unknown_option_lists_allowed(tmp_path):
    with pytest.raises(DataError, match="allowed: .*text_field"):
        run(read_generic, [write(tmp_path / "a.txt", "x")], {"nope": 1})


def test_hub_dataset_unreachable_is_clear_error(tmp_path):
    """The real hub call, in a process with the Hugging Face offline switches on (this
    machine has no network; offline mode fails at once instead of timing out)."""
    pytest.importorskip("datasets")
    code = (
        "from llamaforge.data.generic import read_generic\n"
        "from llamaforge.data.base import FilterStats\n"
        f"opts = {{'hf_dataset': 'no-such/dataset', 'hf_cache_dir': {str(tmp_path)!r}}}\n"
        "list(read_generic([], opts, FilterStats()))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0
    assert "cannot load Hugging Face dataset 'no-such/dataset'" in proc.stderr
