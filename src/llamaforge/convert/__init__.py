"""Moving checkpoints between layouts: Meta, Hugging Face, GGUF, llama2.c and native."""
