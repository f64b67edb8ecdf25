"""Instruction finetuning: data, chat templates, LoRA and the run."""
