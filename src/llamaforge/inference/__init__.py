"""Running a trained model: ``generate`` (sampling, stop strings, batched completions and the
fast single-stream decoder), ``quantize`` (int8 weight-only) and ``chat`` (ChatSession over a
chat template)."""
