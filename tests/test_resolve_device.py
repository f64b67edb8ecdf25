"""device.resolve_device: the one --device resolver (parallel and eval import it)."""

from __future__ import annotations

import pytest
import torch

from llamaforge.device import resolve_device
from llamaforge.eval import lm
from llamaforge.parallel import process


def test_one_definition_everywhere():
    assert process.resolve_device is resolve_device
    assert lm.resolve_device is resolve_device


def test_auto_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available on this machine"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1", local_rank=0)


def test_cuda_index_from_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")  # no rank: the current device
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="--device cuda:5: this machine has 2 CUDA device"):
        resolve_device("cuda:5")


def test_unknown_device_names_the_value():
    with pytest.raises(ValueError, match="--device gpu0: not a device"):
        resolve_device("gpu0")
