"""llamaforge: LLaMA (Touvron et al. 2023) in PyTorch."""

__version__ = "0.1.0"

# chat (the function) deliberately shadows the llamaforge.chat submodule's name here: imported
# eagerly, the package attribute stays the function whatever imports the submodule later.
from .chat import ChatSession, chat  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .generate import generate, generate_completions  # noqa: E402
from .model import ModelArgs, Transformer, build_model  # noqa: E402
from .tokenizer import Tokenizer, train_tokenizer  # noqa: E402

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
