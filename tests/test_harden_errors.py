"""Bad inputs become clear one-line errors (issue 15): damaged or mismatched training
checkpoints, out-of-vocabulary shards, generate/decode arguments, non-finite native
weights, and the CLI's error mapping."""

from __future__ import annotations

import numpy as np
import pytest

from llamaforge.checkpointer import CheckpointerError, verify_checkpoint
from llamaforge.config import ConfigError
from llamaforge.data.base import DataError
from llamaforge.data.mixture import open_sources

from .test_data_mixture import make_prepared
from .test_trainer import trainer


def _saved(tmp_path, steps=(1, 2)):
    t = trainer(tmp_path / "run")
    for s in steps:
        t.step = s
        t.checkpointer.save(s, t.model, t.optimizer, {"step": s, "tokens": 0, "loader": {"i": 0}})
    return t


def test_resume_from_another_model_size_names_the_tensor_and_shapes(tmp_path):
    t = _saved(tmp_path, (1,))
    other = trainer(tmp_path / "run", "model.dim=48", "model.n_heads=3")
    with pytest.raises(
        ConfigError,
        match=r"tok_embeddings.weight has shape \(64, 32\) in the "
        r"checkpoint but \(64, 48\)",
    ):
        other.resume()
    assert t.checkpointer.latest() is not None


def _shard(ckpt):
    return max((p for p in ckpt.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["missing", "truncated", "state"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage, capsys):
    t = _saved(tmp_path)
    good, bad = (p for _, p in t.checkpointer.list())
    if damage == "missing":
        _shard(bad).unlink()
    elif damage == "truncated":
        f = _shard(bad)
        f.write_bytes(f.read_bytes()[:-100])
    else:
        (bad / "state.json").write_text('{"step": 2, "tok')
    with pytest.raises(CheckpointerError, match=str(bad)):
        verify_checkpoint(bad)
    verify_checkpoint(good)
    fresh = trainer(tmp_path / "run")
    assert fresh.resume() == good
    assert fresh.step == 1
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and str(bad) in err
    # an explicit resume=PATH that is damaged is an error naming the file
    explicit = trainer(tmp_path / "run", f"resume={bad}")
    with pytest.raises(ConfigError, match=str(bad)):
        explicit.resume()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    t = _saved(tmp_path, (1,))
    (t.checkpointer.latest() / "state.json").write_text("not json")
    with pytest.raises(ConfigError, match="every checkpoint is damaged"):
        trainer(tmp_path / "run").resume()


def test_a_shard_with_token_ids_outside_the_vocabulary_is_named(tmp_path):
    root = make_prepared(tmp_path / "d", [("a", 3000, 1.0)])
    shard = root / "a" / "train-00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[17] = 60001  # meta.json's vocab_size is 60000; the file keeps its size
    tokens.tofile(shard)
    with pytest.raises(
        DataError,
        match=r"train-00001.bin: token id 60001 \(at position 17\) "
        r"is outside the vocabulary of 60000",
    ):
        open_sources(root)


def test_a_corrupt_meta_or_mixture_json_names_the_file(tmp_path):
    root = make_prepared(tmp_path / "d", [("a", 3000, 1.0)])
    (root / "a" / "meta.json").write_text('{"name": "a", "spl')
    with pytest.raises(DataError, match=r"a/meta.json: not valid JSON"):
        open_sources(root)
    (root / "mixture.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"mixture.json: expected a JSON object"):
        open_sources(root)
