"""Tensor + sequence parallelism (``parallel.tp``) with real torchrun processes on the CPU
(Gloo): losses against one process, resume across layouts, sharded greedy generation,
and the errors for layouts and models that do not split."""

from __future__ import annotations

import pytest

from llamaforge.config import ConfigError, load_config
from llamaforge.pretrain import PretrainConfig, run_pretrain

from .test_pretrain import corpus, metrics, overrides, run  # noqa: F401  (corpus: a fixture)

TINY = ("model.n_kv_heads=2", "model.vocab_size=300")


@pytest.mark.slow
def test_tp2_matches_one_process(corpus, tmp_path):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "tp2"
    run(corpus, one, *TINY)
    run(corpus, two, *TINY, "parallel.tp=2", nproc=2)
    ref, got = metrics(one), metrics(two)
    assert sorted(got) == sorted(ref) == list(range(1, 11))
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])


def test_debug(corpus, tmp_path):  # noqa: F811
    p = run(corpus, tmp_path / "x", *TINY, "parallel.tp=2", nproc=2)
    print(p.stderr[-3000:])
    print(metrics(tmp_path / "x"))
    p = run(corpus, tmp_path / "y", *TINY, "parallel.tp=2", nproc=4)
    print(p.stderr[-3000:])
    print(metrics(tmp_path / "y"))
    p = run(corpus, tmp_path / "z", *TINY)
    print(metrics(tmp_path / "z"))
