"""Instruction finetuning (the paper's LLaMA-I): data, templates and training."""
