"""Experiments on the paper's claims: the GPT-2 → LLaMA block ablations (``blocks``), the
study's cells and runner (``study``) and its results page (``report``)."""
