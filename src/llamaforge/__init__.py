"""llamaforge: LLaMA (Touvron et al. 2023) in PyTorch.

The public API is imported lazily (PEP 562 ``__getattr__``): ``import llamaforge`` and the
command line's ``--help`` do not load torch; ``llamaforge.load(...)``,
``llamaforge.chat(...)`` ... import their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "ChatSession": "inference.chat",
    "chat": "inference.chat",
    "load": "checkpoint.native",
    "save": "checkpoint.native",
    "generate": "inference.generate",
    "generate_completions": "inference.generate",
    "ModelArgs": "model",
    "Transformer": "model",
    "build_model": "model",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the imports
    from llamaforge.checkpoint.native import load, save
    from llamaforge.inference.chat import ChatSession, chat
    from llamaforge.inference.generate import generate, generate_completions
    from llamaforge.model import ModelArgs, Transformer, build_model
    from llamaforge.tokenizer import Tokenizer, train_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "ChatSession",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
    "__version__",
    "build_model",
    "chat",
    "generate",
    "generate_completions",
    "load",
    "save",
    "train_tokenizer",
]
