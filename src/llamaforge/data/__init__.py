"""Data: corpora, cleaning, tokenized shards and the mixture sampler."""
