"""`LlamaforgeLM`: the LanguageModel of base.py on a llamaforge Transformer.

Log-likelihoods are scored in padded batches, one forward pass per batch:

* a request is tokenised as lm-eval does for causal models: trailing whitespace of the
  context moves to the continuation, the context is encoded with BOS, and the continuation's
  tokens are what encoding context+continuation adds after the context's tokens (so
  " Paris" after "…is" is ``▁Paris``, not SentencePiece's stand-alone ``▁ ▁Paris``);
  an empty context is BOS alone;
* the model input is ``(context + continuation)[:-1]``, cut from the left to the model's
  context length; rows are right-padded (causal attention never lets a real position see
  padding) and sorted longest first, with rows of one context next to each other;
* the output layer and an fp32 log-softmax run on the continuation positions only, never on
  the whole (batch, sequence, vocabulary) block;
* identical requests are scored once.

Rolling log-likelihoods become token-level requests (windows of the model's context, as
lm-eval's rolling windows) and go through the same batches. Generation calls
``llamaforge.inference.generate.generate_completions``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from llamaforge.device import resolve_device
from llamaforge.eval.base import EvalError, Generate, Loglikelihood, LoglikelihoodResult, Rolling
from llamaforge.inference.generate import generate_completions
from llamaforge.model import KVCache, Transformer
from llamaforge.tokenizer import Tokenizer

TokenPair = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)

DEFAULT_BATCH_TOKENS_CPU = 8192
DEFAULT_BATCH_TOKENS_GPU = 65536
DEFAULT_GEN_BATCH_CPU = 16
DEFAULT_GEN_BATCH_GPU = 64


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any values, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled or total == 0, leave=False)


class LlamaforgeLM:
    """A llamaforge model and tokenizer behind the LanguageModel protocol of base.py.

    ``batch_tokens`` bounds a scoring batch by rows × padded length; ``batch_size`` caps its
    rows (and the rows of a generation batch). ``max_length`` shortens the context the
    evaluation uses (default: the model's ``max_seq_len``). ``sample_mode`` chooses how sampled
    generations are seeded: "per_sample" (one generation call per sample, sample j seeded from
    (seed, j), exactly as base.Generate documents) or "per_request" (all samples of a request
    in one batch seeded from (seed, num_samples): much faster, still independent of the other
    requests).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        batch_tokens: int | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        progress: bool = True,
        ckpt_dir: str | os.PathLike | None = None,
        sample_mode: str = "per_sample",
        share_context: bool = True,
    ) -> None:
        if sample_mode not in ("per_sample", "per_request"):
            raise ValueError(
                f"sample_mode must be 'per_sample' or 'per_request', not {sample_mode!r}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        weight = next(model.parameters())
        self.device = weight.device
        self.dtype = weight.dtype
        gpu = self.device.type != "cpu"
        self.batch_tokens = int(
            batch_tokens or (DEFAULT_BATCH_TOKENS_GPU if gpu else DEFAULT_BATCH_TOKENS_CPU)
        )
        self.batch_size = batch_size
        self.gen_batch_size = batch_size or (
            DEFAULT_GEN_BATCH_GPU if gpu else DEFAULT_GEN_BATCH_CPU
        )
        model_len = model.args.max_seq_len
        if max_length is not None and not 1 < max_length <= model_len:
            raise ValueError(f"max_length={max_length} must be in 2..{model_len} (max_seq_len)")
        self.max_length = int(max_length or model_len)
        if self.batch_tokens < self.max_length:
            self.batch_tokens = self.max_length  # one full-length row always fits
        self.progress = progress
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        self.sample_mode = sample_mode
        self.share_context = share_context
        self.calls = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate": 0}
        self.forward_passes = 0

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | os.PathLike,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        *,
        batch_tokens: int | None = None,
        progress: bool = True,
        tokenizer: str | os.PathLike | None = None,
        sample_mode: str = "per_sample",
        strict: bool = False,
        force: bool = False,
    ) -> LlamaforgeLM:
        """Load a native checkpoint. ``dtype`` defaults to bf16 on a GPU, fp32 on the CPU;
        ``strict`` refuses one with NaN/Inf weights, ``force`` takes a tokenizer whose hash
        differs from the recorded one with a warning (`checkpoint.load`)."""
        from llamaforge.checkpoint.native import CheckpointError, load

        dev = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model, tok = load(
            ckpt_dir, device=dev, dtype=dtype, tokenizer=tokenizer, strict=strict, force=force
        )
        if tok is None:
            raise CheckpointError(f"{ckpt_dir}: no tokenizer.model in the checkpoint")
        return cls(
            model,
            tok,
            batch_tokens=batch_tokens,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
            ckpt_dir=ckpt_dir,
            sample_mode=sample_mode,
        )

    def describe(self) -> dict[str, Any]:
        """Settings worth recording next to results."""
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": self.max_length,
            "batch_tokens": self.batch_tokens,
            "sample_mode": self.sample_mode,
        }

    # ------------------------------------------------------------------ tokenisation

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        """Context and continuation ids, split the way lm-eval splits them (module doc)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        tok = self.tokenizer
        if not context:
            return (tok.bos_id,), tuple(tok.encode(continuation, bos=False))
        ctx = tok.encode(context, bos=True)
        whole = tok.encode(context + continuation, bos=True)
        return tuple(ctx), tuple(whole[len(ctx) :])

    def rolling_windows(self, text: str) -> list[TokenPair]:
        """Token-level requests whose scores sum to log P(text | BOS).

        The predicted tokens are cut into disjoint windows of ``max_length``; each window's
        input is the ``max_length`` tokens before its last prediction (the first window starts
        at BOS, later ones take preceding tokens as context), as lm-eval's rolling windows.
        """
        full = [self.tokenizer.bos_id, *self.tokenizer.encode(text, bos=False)]
        length = self.max_length
        out = []
        for a in range(1, len(full), length):
            b = min(a + length, len(full))
            start = max(0, b - 1 - length)
            out.append((tuple(full[start:a]), tuple(full[a:b])))
        return out

    # ------------------------------------------------------------------ scoring

    def loglikelihood_tokens(
        self, pairs: Sequence[TokenPair], desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """(sum log-prob, is_greedy) of each continuation given its context, on token ids.

        A continuation longer than the model's context (a long PIQA solution on a small
        model) is scored in windows, as rolling log-likelihoods are: chunks of half the
        context, each predicted from the tokens just before it, the log-probs summed.
        """
        length = self.max_length
        chunk = max(1, length // 2)
        flat: list[TokenPair] = []
        parts: list[range] = []
        for ctx, cont in pairs:
            start = len(flat)
            if len(cont) <= length:
                flat.append((ctx, cont))
            else:
                for a in range(0, len(cont), chunk):
                    flat.append((ctx + cont[:a], cont[a : a + chunk]))
            parts.append(range(start, len(flat)))
        scored = self._loglikelihood_windows(flat, desc)
        return [
            (sum(scored[i][0] for i in part), all(scored[i][1] for i in part)) for part in parts
        ]

    def _loglikelihood_windows(
        self, pairs: Sequence[TokenPair], desc: str
    ) -> list[tuple[float, bool]]:
        """``loglikelihood_tokens`` for continuations that fit the context.

        Each request's input ``(context + continuation)[:-1]`` (cut from the left to
        ``max_length``) is split into a prefix, up to the position that predicts the first
        continuation token, and the rest. Requests with the same prefix (the choices of a
        multiple-choice question) form a group: its prefix runs once, its rows continue from
        a copy of the prefix's KV cache (``KVCache.reorder``). Prefixes are left-padded and
        masked, and every row runs at its true positions (the padding's are negative).
        """
        unique = list(dict.fromkeys(pairs))
        where = {p: i for i, p in enumerate(unique)}
        length = self.max_length
        prefix: list[tuple[int, ...]] = []
        rest: list[tuple[int, ...]] = []
        for ctx, cont in unique:
            if not cont:
                raise EvalError("loglikelihood: the continuation encodes to no tokens")
            if len(cont) > length:
                raise EvalError(
                    f"loglikelihood: a continuation of {len(cont)} tokens does not fit the "
                    f"model's context of {length}"
                )
            if not ctx:
                raise EvalError("loglikelihood: empty context (it needs at least BOS)")
            seq = (ctx + cont)[-(length + 1) : -1]
            cut = len(seq) - len(cont) + 1
            prefix.append(seq[:cut])
            rest.append(seq[cut:])
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prefix):
            groups.setdefault(p, []).append(i)
        order = sorted(
            groups.values(),
            key=lambda g: (-len(prefix[g[0]]), -max(len(rest[i]) for i in g), prefix[g[0]]),
        )
        results: list[tuple[float, bool]] = [(0.0, False)] * len(unique)
        bar = _progress(len(unique), desc, self.progress)
        with torch.inference_mode():
            for batch in self._group_batches(order, prefix, rest):
                if self.share_context and any(len(g) > 1 for g in batch):
                    self._score_shared(batch, prefix, rest, unique, results)
                else:
                    self._score_plain([i for g in batch for i in g], prefix, rest, unique, results)
                bar.update(sum(len(g) for g in batch))
        bar.close()
        return [results[where[p]] for p in pairs]

    def _group_batches(self, order, prefix, rest) -> Iterable[list[list[int]]]:
        """Consecutive groups within the token budget: prefix rows × longest prefix plus
        continuation rows × longest rest (all rows × longest input without sharing)."""
        batch: list[list[int]] = []
        n_groups = n_rows = lp = lq = lfull = 0
        for g in order:
            rows = len(g)
            g_lp = len(prefix[g[0]])
            g_lq = max(len(rest[i]) for i in g)
            new = (max(lp, g_lp), max(lq, g_lq), max(lfull, g_lp + g_lq))
            if self.share_context:
                cost = (n_groups + 1) * new[0] + (n_rows + rows) * new[1]
            else:
                cost = (n_rows + rows) * new[2]
            too_many = self.batch_size is not None and n_rows + rows > self.batch_size
            if batch and (cost > self.batch_tokens or too_many):
                yield batch
                batch, n_groups, n_rows = [], 0, 0
                new = (g_lp, g_lq, g_lp + g_lq)
            batch.append(g)
            n_groups, n_rows = n_groups + 1, n_rows + rows
            lp, lq, lfull = new
        if batch:
            yield batch

    def _finish(self, rows, hidden, unique, results) -> None:
        """Output layer and fp32 log-softmax on the gathered continuation positions."""
        target = torch.tensor(
            [t for i in rows for t in unique[i][1]], dtype=torch.long, device=self.device
        )
        logp = torch.log_softmax(self.model.output(hidden).float(), dim=-1)
        token_lp = logp.gather(-1, target[:, None])[:, 0].double().cpu()
        greedy = (logp.argmax(-1) == target).cpu()
        start = 0
        for i in rows:
            n = len(unique[i][1])
            results[i] = (
                float(token_lp[start : start + n].sum()),
                bool(greedy[start : start + n].all()),
            )
            start += n

    def _score_plain(self, rows, prefix, rest, unique, results) -> None:
        """One right-padded causal pass over whole inputs (no sharing)."""
        inputs = [prefix[i] + rest[i] for i in rows]
        longest = max(map(len, inputs))
        tokens = torch.zeros((len(rows), longest), dtype=torch.long)
        r_idx, c_idx = [], []
        for r, (i, seq) in enumerate(zip(rows, inputs)):
            tokens[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            n = len(unique[i][1])
            r_idx += [r] * n
            c_idx += range(len(seq) - n, len(seq))
        hidden = self.model(tokens.to(self.device), return_hidden=True)
        self.forward_passes += 1
        dev = self.device
        picked = hidden[torch.tensor(r_idx, device=dev), torch.tensor(c_idx, device=dev)]
        self._finish(rows, picked, unique, results)

    def _score_shared(self, batch, prefix, rest, unique, results) -> None:
        """Prefixes once (left-padded), then every row's rest on a copy of its prefix's cache."""
        dev = self.device
        n_groups = len(batch)
        lp = max(len(prefix[g[0]]) for g in batch)
        lq = max(len(rest[i]) for g in batch for i in g)
        pads = torch.tensor([lp - len(prefix[g[0]]) for g in batch], device=dev)
        tokens = torch.zeros((n_groups, lp), dtype=torch.long)
        for j, g in enumerate(batch):
            p = prefix[g[0]]
            tokens[j, lp - len(p) :] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(dev)
        rows = [i for g in batch for i in g]
        self.forward_passes += 1
        owner = torch.tensor([j for j, g in enumerate(batch) for _ in g], device=dev)
        if lq == 0:  # one-token continuations: only the prefixes' last positions are needed
            right = torch.zeros((n_groups, lp), dtype=torch.long)
            for j, g in enumerate(batch):
                right[j, : len(prefix[g[0]])] = torch.tensor(prefix[g[0]], dtype=torch.long)
            hidden = self.model(right.to(dev), return_hidden=True)
            last = torch.tensor([len(prefix[g[0]]) - 1 for g in batch], device=dev)
            hidden = hidden[torch.arange(n_groups, device=dev), last]
            self._finish(rows, hidden[owner], unique, results)
            return
        model = self.model
        cache = KVCache(model.args, n_groups, lp + lq, self.dtype, dev)
        positions = torch.arange(lp, device=dev)[None, :] - pads[:, None]  # padding: < 0
        h1 = model(
            tokens,
            mask=self._prefix_mask(pads, lp),
            positions=positions,
            cache=cache,
            return_hidden=True,
        )[:, -1]
        cache.reorder(owner)  # each row continues from its own copy of its group's prefix
        cont = torch.zeros((len(rows), lq), dtype=torch.long)
        for r, i in enumerate(rows):
            if rest[i]:
                cont[r, : len(rest[i])] = torch.tensor(rest[i], dtype=torch.long)
        keys = torch.arange(lp + lq, device=dev)
        queries = torch.arange(lq, device=dev)
        see_prefix = keys[None, :] >= pads[owner][:, None]  # (rows, keys)
        causal = keys[None, :] <= (lp + queries)[:, None]  # (queries, keys)
        mask = see_prefix[:, None, :] & causal[None]  # (rows, queries, keys)
        positions = (lp - pads[owner])[:, None] + queries[None, :]
        h2 = model(
            cont.to(dev),
            lp,
            mask=mask[:, None],
            positions=positions,
            cache=cache,
            return_hidden=True,
        )
        pieces = []
        for r, i in enumerate(rows):
            pieces.append(h1[owner[r] : owner[r] + 1])
            pieces.append(h2[r, : len(rest[i])])
        self._finish(rows, torch.cat(pieces), unique, results)

    @staticmethod
    def _prefix_mask(pads: torch.Tensor, lp: int) -> torch.Tensor:
        """(groups, 1, lp, lp): causal, real keys only; a padding query sees itself."""
        pos = torch.arange(lp, device=pads.device)
        causal = pos[None, :] <= pos[:, None]
        real = pos[None, :] >= pads[:, None]
        mask = causal[None] & real[:, None, :]
        mask |= torch.eye(lp, dtype=torch.bool, device=pads.device)[None]
        return mask[:, None]

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]:
        self.calls["loglikelihood"] += 1
        pairs = [self.encode_pair(r.context, r.continuation) for r in requests]
        scored = self.loglikelihood_tokens(pairs)
        return [LoglikelihoodResult(lp, g, len(p[1])) for (lp, g), p in zip(scored, pairs)]

    def loglikelihood_rolling(self, requests: Sequence[Rolling]) -> list[float]:
        self.calls["loglikelihood_rolling"] += 1
        windows = [self.rolling_windows(r.text) for r in requests]
        flat = [w for ws in windows for w in ws]
        scored = iter(self.loglikelihood_tokens(flat, desc="loglikelihood_rolling"))
        return [sum(next(scored)[0] for _ in ws) for ws in windows]

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[Generate]) -> list[list[str]]:
        """``num_samples`` continuations per request (see base.Generate for seeding)."""
        self.calls["generate"] += 1
        unique = list(dict.fromkeys(requests))
        out: dict[Generate, list[str]] = {}
        bar = _progress(len(unique), "generate", self.progress)
        groups: dict[tuple, list[Generate]] = {}
        for r in unique:
            if r.num_samples < 1:
                raise EvalError(f"generate: num_samples must be at least 1, got {r.num_samples}")
            key = (r.until, r.max_new_tokens, r.temperature, r.top_p)
            groups.setdefault(key, []).append(r)
        for (until, max_new, temperature, top_p), reqs in groups.items():
            kwargs = dict(max_new_tokens=max_new, stop=until, truncate=True)
            if temperature <= 0:
                # greedy: batch freely, similar prompt lengths together
                encoded = {r: self.tokenizer.encode(r.context, bos=True) for r in reqs}
                reqs = sorted(reqs, key=lambda r: -len(encoded[r]))
                for s in range(0, len(reqs), self.gen_batch_size):
                    chunk = reqs[s : s + self.gen_batch_size]
                    done = generate_completions(
                        self.model,
                        self.tokenizer,
                        [encoded[r] for r in chunk],
                        temperature=0.0,
                        top_p=1.0,
                        **kwargs,
                    )
                    for r, c in zip(chunk, done):
                        out[r] = [c.text] * r.num_samples
                    bar.update(len(chunk))
                continue
            for r in reqs:
                if self.sample_mode == "per_request":
                    texts: list[str] = []
                    n = r.num_samples
                    for s in range(0, n, self.gen_batch_size):
                        rows = min(self.gen_batch_size, n - s)
                        done = generate_completions(
                            self.model,
                            self.tokenizer,
                            [r.context] * rows,
                            temperature=temperature,
                            top_p=top_p,
                            seed=derive_seed(r.seed, n, s),
                            **kwargs,
                        )
                        texts += [c.text for c in done]
                else:
                    texts = []
                    for j in range(r.num_samples):
                        (c,) = generate_completions(
                            self.model,
                            self.tokenizer,
                            [r.context],
                            temperature=temperature,
                            top_p=top_p,
                            seed=derive_seed(r.seed, j),
                            **kwargs,
                        )
                        texts.append(c.text)
                out[r] = texts
                bar.update(1)
        bar.close()
        return [list(out[r]) for r in requests]
