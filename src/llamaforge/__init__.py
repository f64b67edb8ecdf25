"""llamaforge: LLaMA (Touvron et al. 2023) in PyTorch.

The public API is imported lazily (PEP 562 ``__getattr__``): ``import llamaforge`` and the
command line's ``--help`` do not load torch; ``llamaforge.load(...)``,
``llamaforge.chat(...)`` ... import their module on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "ChatSession": "chat_session",
    "chat": "chat_session",
    "load": "checkpoint",
    "save": "checkpoint",
    "generate": "generate",
    "generate_completions": "generate",
    "ModelArgs": "model",
    "Transformer": "model",
    "build_model": "model",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ does the imports
    from .chat_session import ChatSession, chat
    from .checkpoint import load, save
    from .generate import generate, generate_completions
    from .model import ModelArgs, Transformer, build_model
    from .tokenizer import Tokenizer, train_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``generate`` names a submodule and the public function. Importing the submodule
    (``from llamaforge.generate import ...``) makes Python set the package attribute to the
    module; that one assignment is refused, so ``llamaforge.generate`` is the function
    whatever was imported before (the submodule stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
