"""Evaluation: the paper's benchmarks and protocols (see base.py for the contract)."""
