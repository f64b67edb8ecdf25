"""`llamaforge data prepare / stats / show` end to end, on small real inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llamaforge.config import ConfigError
from llamaforge.data.base import DataError
from llamaforge.data.mixture import TokenSource
from llamaforge.data.prepare import load_data_config, prepare
from llamaforge.data.report import first_documents, table1
from llamaforge.data.shards import FORMAT_VERSION

from .conftest import REPO

STORIES = [
    "Once upon a time there was a little fox. The fox liked to run in the green forest.",
    "Tom had a red ball. He threw the ball to his dog, and the dog brought it back.",
    "The sun was warm. Lily and her mom went to the park to play on the swings.",
]


def write_config(tmp_path, extra_sources="", tokenizer=None):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    rows = [{"text": f"{s} Story number {i}."} for i in range(200) for s in STORIES]
    (corpus / "stories.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (corpus / "notes.txt").write_text(
        "\n\n".join(f"Note {i}: " + STORIES[i % 3] * 2 for i in range(150))
    )
    tok = tokenizer or tmp_path / "out" / "tokenizer.model"
    config = tmp_path / "data.toml"
    config.write_text(f"""
tokenizer = "{tok}"
tokenizer_vocab_size = 400
output = "{tmp_path / "out"}"
val_fraction = 0.1
shard_tokens = 5000
workers = 1
[[sources]]
name = "stories"
kind = "generic"
paths = ["{corpus / "stories.jsonl"}"]
weight = 3.0
[[sources]]
name = "notes"
kind = "generic"
paths = ["{corpus / "*.txt"}"]
weight = 1.0
options = {{ split = "paragraph" }}
{extra_sources}
""")
    return config


def test_prepare_writes_shards_meta_and_mixture(tmp_path):
    cfg = load_data_config(write_config(tmp_path))
    results = prepare(cfg, progress=False, log=lambda s: None)
    assert all(r["complete"] for r in results)
    out = tmp_path / "out"
    mixture = json.loads((out / "mixture.json").read_text())
    assert mixture["sources"] == [
        {"name": "stories", "weight": 3.0},
        {"name": "notes", "weight": 1.0},
    ]
    meta = json.loads((out / "stories" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    assert meta["format_version"] == FORMAT_VERSION
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == 600
    assert 0 < val["documents"] < 120  # about 10 % held out, by document
    assert len(train["shards"]) >= 3  # 5k-token shards
    src = TokenSource(out / "stories")
    tokens = np.concatenate(src.arrays)
    assert tokens[0] == meta["bos_id"] and (tokens == meta["eos_id"]).sum() == train["documents"]
    assert not list(out.rglob(".*"))  # nothing half-written (hidden temporaries) left
    first = first_documents(out, "stories", n=2)
    assert len(first) == 2 and all(d.split(" Story number")[0] in STORIES for d in first)
    rows = table1(out, 1_000_000)
    assert [r["source"] for r in rows] == ["stories", "notes"]
    assert rows[0]["proportion"] == pytest.approx(0.75)
    assert rows[0]["epochs"] == pytest.approx(750_000 / rows[0]["tokens"])


def test_rerun_skips_finished_sources_and_redoes_changed_ones(tmp_path):
    config = write_config(tmp_path)
    prepare(load_data_config(config), progress=False, log=lambda s: None)
    again = prepare(load_data_config(config), progress=False, log=lambda s: None)
    assert all(r.get("skipped") for r in again)
    changed = prepare(
        load_data_config(config, ["val_fraction=0.2"]), progress=False, log=lambda s: None
    )
    assert not any(r.get("skipped") for r in changed)


def test_a_failing_source_is_reported_and_the_others_finish(tmp_path):
    bad = """
[[sources]]
name = "missing"
kind = "books"
paths = ["/nonexistent/books/*.txt"]
"""
    cfg = load_data_config(write_config(tmp_path, bad))
    (tmp_path / "out").mkdir()
    from llamaforge.tokenizer import train_tokenizer

    train_tokenizer(iter(STORIES * 50), tmp_path / "out" / "tokenizer.model", vocab_size=300)
    results = {r["name"]: r for r in prepare(cfg, progress=False, log=lambda s: None)}
    assert results["stories"]["complete"] and results["notes"]["complete"]
    assert not results["missing"]["complete"]
    assert "/nonexistent/books/*.txt" in results["missing"]["error"]
    assert [
        s["name"] for s in json.loads((tmp_path / "out" / "mixture.json").read_text())["sources"]
    ] == ["stories", "notes"]


def test_config_errors_name_the_problem(tmp_path):
    config = write_config(tmp_path, '[[sources]]\nname = "x"\nkind = "podcasts"\n')
    with pytest.raises(ConfigError, match="unknown kind 'podcasts'"):
        load_data_config(config)
    config = write_config(tmp_path, tokenizer=tmp_path / "none.model")
    cfg = load_data_config(config, ["tokenizer_vocab_size=0"])
    with pytest.raises(DataError, match="none.model: tokenizer not found"):
        prepare(cfg, progress=False, log=lambda s: None)


def test_cli_prepare_stats_show(tmp_path):
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "llamaforge", "data", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    r = run("prepare", config, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "stories:" in r.stdout and "notes:" in r.stdout
    stats = run("stats", tmp_path / "out", "--tokens", "1e6")
    assert "Sampling prop." in stats.stdout and "75.0%" in stats.stdout
    show = run("show", tmp_path / "out", "--source", "notes", "-n", "2")
    assert show.stdout.count("=== notes document") == 2 and "Note " in show.stdout
    missing = run("show", tmp_path / "out", "--source", "nope")
    assert missing.returncode == 2 and "no source 'nope'" in missing.stderr


def test_shipped_configs_load():
    for name in ("stdlib.toml", "shared.toml"):
        cfg = load_data_config(REPO / "configs" / "data" / name)
        assert cfg.sources and all(s.weight > 0 for s in cfg.sources)


def test_a_folder_prepared_with_another_tokenizer_needs_force(tmp_path, capsys):
    from llamaforge.cli.main import main
    from llamaforge.tokenizer import Tokenizer, train_tokenizer

    config = write_config(tmp_path)
    quiet = {"progress": False, "log": lambda s: None}
    prepare(load_data_config(config), **quiet)  # trains out/tokenizer.model (400 pieces)
    out = tmp_path / "out"
    old = Tokenizer(out / "tokenizer.model").sha256()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other.model"
    new = train_tokenizer(iter(STORIES * 50), other, vocab_size=300).sha256()
    cfg = load_data_config(config, [f"tokenizer={other}"])
    with pytest.raises(DataError, match="prepared with another tokenizer") as e:
        prepare(cfg, **quiet)
    for part in (str(out), old, new, "--force"):
        assert part in str(e.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    args = ["data", "prepare", str(config), f"tokenizer={other}", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert old in err and new in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--force"]) == 0
    # every part of the folder now names the new tokenizer, tokenizer.model included
    assert json.loads((out / "mixture.json").read_text())["tokenizer_sha256"] == new
    for name in ("stories", "notes"):
        assert json.loads((out / name / "meta.json").read_text())["tokenizer_sha256"] == new
    assert Tokenizer(out / "tokenizer.model").sha256() == new
    assert TokenSource(out / "stories").arrays  # readable as before
    assert all(r.get("skipped") for r in prepare(cfg, **quiet))  # agrees now: no --force


def test_invalid_utf8_is_replaced_on_request_and_an_empty_source_fails(tmp_path, capsys):
    from llamaforge.cli.main import main
    from llamaforge.tokenizer import train_tokenizer

    latin = tmp_path / "latin"
    latin.mkdir()
    for i in range(20):  # one bad byte each: today the whole file is dropped
        (latin / f"{i}.txt").write_bytes(f"Caf{chr(0xE9)} number {i}. ".encode("latin-1") * 5)
    (latin / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    extra = f'[[sources]]\nname = "latin"\nkind = "generic"\npaths = ["{latin}/*.txt"]\n'
    config = write_config(tmp_path, extra)
    (tmp_path / "out").mkdir()
    train_tokenizer(iter(STORIES * 50), tmp_path / "out" / "tokenizer.model", vocab_size=300)
    assert main(["data", "prepare", str(config), "--quiet"]) == 1  # nothing left of latin
    err = capsys.readouterr()
    assert "latin: FAILED: source latin: no documents left of 21 file(s)" in err.out
    assert 'errors = "replace" keeps' in err.out and "failed sources: latin" in err.err
    mixture = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert [s["name"] for s in mixture["sources"]] == ["stories", "notes"]
    config.write_text(config.read_text() + 'errors = "replace"\n')  # the latin source's
    cfg = load_data_config(config)
    assert cfg.sources[2].errors == "replace"
    results = {r["name"]: r for r in prepare(cfg, progress=False, log=lambda s: None)}
    latin_meta = results["latin"]
    assert latin_meta["complete"] and latin_meta["clean"]["replaced_bytes"] == 20 * 5
    assert latin_meta["splits"]["train"]["documents"] + latin_meta["splits"]["val"]["documents"]
    assert len(latin_meta["clean"]["errors"]) == 1  # the binary file is still skipped
    assert results["stories"].get("skipped")  # the others untouched
    text = (tmp_path / "out" / "latin" / "clean.jsonl").read_text(encoding="utf-8")
    assert "Caf\ufffd number 0." in text
    config.write_text(config.read_text().replace('"replace"', '"ignore"'))
    with pytest.raises(ConfigError, match="errors='ignore'; expected one of strict, replace"):
        load_data_config(config)
