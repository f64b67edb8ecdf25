"""The Table 1 mixture sampler: proportions, epochs, determinism, distributed resume."""

import json

import numpy as np
import pytest
import torch

from llamaforge.data.base import DataError
from llamaforge.data.mixture import (
    MixtureLoader,
    MixtureSampler,
    open_sources,
    permute,
    validation_batches,
)
from llamaforge.data.shards import FORMAT_VERSION, META_FILE


def make_prepared(root, sources, sha="abc", shard_tokens=1000):
    """A prepared folder in the format `data prepare` writes: per source meta.json and
    uint16 shards; token t of source i is i*10000 + position (so windows are traceable)."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, n_tokens, weight) in enumerate(sources):
        d = root / name
        d.mkdir()
        splits = {}
        for split, n in (("train", n_tokens), ("val", 300)):
            tokens = (np.arange(n) % 10000 + i * 10000).astype(np.uint16)
            shards = []
            for k, start in enumerate(range(0, n, shard_tokens)):
                part = tokens[start : start + shard_tokens]
                part.tofile(d / f"{split}-{k:05d}.bin")
                shards.append({"file": f"{split}-{k:05d}.bin", "tokens": len(part)})
            splits[split] = {"tokens": n, "documents": 1, "shards": shards}
        meta = {
            "name": name,
            "kind": "generic",
            "weight": weight,
            "tokenizer": "t.model",
            "tokenizer_sha256": sha,
            "vocab_size": 60000,
            "dtype": "uint16",
            "bos": True,
            "eos": True,
            "bos_id": 1,
            "eos_id": 2,
            "splits": splits,
            "clean": {"bytes_out": n_tokens * 4, "removed": {}, "errors": []},
            "complete": True,
        }
        (d / "meta.json").write_text(json.dumps(meta))
        entries.append({"name": name, "weight": weight})
    (root / "mixture.json").write_text(json.dumps({"sources": entries, "tokenizer_sha256": sha}))
    return root


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 12345])
def test_permute_is_a_seeded_bijection(n):
    idx = np.arange(n)
    p = permute(idx, n, key=42)
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(p, permute(idx, n, key=42))
    if n >= 64:
        assert not np.array_equal(p, permute(idx, n, key=43))
        assert not np.array_equal(p, idx)


@pytest.fixture()
def data(tmp_path):
    return make_prepared(
        tmp_path / "d", [("web", 50_000, 6.7), ("books", 8_000, 2.0), ("wiki", 3_000, 1.3)]
    )


def sampler(data, seed=0, seq_len=64):
    sources, weights = open_sources(data)
    return MixtureSampler(sources, weights, seq_len, seed)


def test_proportions_are_exact_to_one_sample(data):
    s = sampler(data)
    plan = s.plan(5000)
    counts = np.bincount([src for src, _ in plan], minlength=3)
    expected = np.array([6.7, 2.0, 1.3]) / 10 * 5000
    assert np.all(np.abs(counts - expected) <= 1)


def test_windows_without_replacement_within_an_epoch_then_reshuffled(data):
    s = sampler(data)
    n_wiki = s.windows[2]
    draws = [w for src, w in s.plan(4000) if src == 2]
    first, second = draws[:n_wiki], draws[n_wiki : 2 * n_wiki]
    assert sorted(first) == list(range(n_wiki)) and sorted(second) == list(range(n_wiki))
    assert first != second
    assert s.epochs()["wiki"] == pytest.approx(len(draws) / n_wiki)
    rows = s.fetch([(2, 3)])
    assert rows.shape == (1, 65) and rows[0, 0] == 20000 + 3 * 64  # traceable window start


def test_windows_cross_shard_boundaries(data):
    s = sampler(data)
    row = s.fetch([(0, 15)])[0]  # tokens 960..1024 span shard files 0 and 1
    assert row.tolist() == list(range(960, 1025))


def test_deterministic_from_the_seed(data):
    assert sampler(data, 1).plan(300) == sampler(data, 1).plan(300)
    assert sampler(data, 1).plan(300) != sampler(data, 2).plan(300)


@pytest.mark.parametrize("world_after", [1, 2, 4])
def test_resume_gives_the_next_batches_on_any_world_size(data, world_after):
    straight = MixtureLoader(sampler(data), global_batch=8)
    expected = [next(straight) for _ in range(10)]
    first = MixtureLoader(sampler(data), global_batch=8, world_size=2, rank=0)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    ranks = [
        MixtureLoader(sampler(data), 8, rank=r, world_size=world_after) for r in range(world_after)
    ]
    for loader in ranks:
        loader.load_state_dict(state)
    for step in range(6, 10):
        parts = [next(loader) for loader in ranks]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        assert torch.equal(x, expected[step][0]) and torch.equal(y, expected[step][1])
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_errors_name_the_problem(data, tmp_path):
    with pytest.raises(DataError, match="built with tokenizer abc"):
        open_sources(data, tokenizer_sha256="def")
    with pytest.raises(DataError, match="no mixture.json"):
        open_sources(tmp_path)
    (data / "books" / "train-00001.bin").unlink()
    with pytest.raises(DataError, match="train-00001.bin: missing"):
        open_sources(data)
    newer = make_prepared(tmp_path / "v", [("a", 5000, 1.0)])
    meta = json.loads((newer / "a" / META_FILE).read_text())
    (newer / "a" / META_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match=f"format_version {FORMAT_VERSION + 1} is newer"):
        open_sources(newer)
    (newer / "a" / META_FILE).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(DataError, match="did not complete"):
        open_sources(newer)
    s = sampler(make_prepared(tmp_path / "e", [("a", 5000, 1.0)]))
    with pytest.raises(DataError, match="seq_len or seed"):
        MixtureSampler(s.sources, [1.0], 32, 0).load_state_dict(s.state_dict())
    with pytest.raises(DataError, match="not divisible"):
        MixtureLoader(s, 6, world_size=4)


def test_validation_batches_follow_the_weights(data):
    batches = validation_batches(data, seq_len=32, batch_size=4, max_batches=2)
    assert len(batches) == 2 and batches[0][0].shape == (4, 32)
    sources = {int(x[0, 0]) // 10000 for x, _ in batches for x in x.split(1)}
    assert 0 in sources  # the heaviest source is represented


def test_scalar_and_vector_permutations_agree():
    from llamaforge.data.mixture import permute_one

    for n in (2, 5, 100, 4097):
        v = permute(np.arange(n), n, key=7)
        assert [permute_one(i, n, 7) for i in range(n)] == v.tolist()
