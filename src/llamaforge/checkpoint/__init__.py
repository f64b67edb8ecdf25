"""Checkpoints: the native format (``native``: params.json, safetensors shards, the tokenizer
and chat template beside them) and conversion to and from Meta's, Hugging Face's, GGUF and
llama2.c's layouts (``convert``). The training run's DCP checkpoints are
``llamaforge.training.checkpointer``'s."""

from llamaforge.checkpoint.native import CheckpointError, load, read_params, save

__all__ = ["CheckpointError", "load", "read_params", "save"]
