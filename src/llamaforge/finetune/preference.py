"""Preference tuning after LLaMA-I (``llamaforge finetune`` with ``method`` dpo or simpo) on
the Trainer that pretraining and instruction finetuning share.

* **Data.** Each record is a prompt and two answers, ``chosen`` and ``rejected``, in one of
  the common shapes, detected per file from its first record: ``strings`` (``prompt`` /
  ``chosen`` / ``rejected`` text: UltraFeedback's binarized form with strings, HH-RLHF with
  a prompt column), ``messages`` (``chosen`` / ``rejected`` as message lists, the prompt's
  messages leading them or in ``prompt``: UltraFeedback binarized, TRL's conversational
  form) and ``hh`` (HH-RLHF's raw ``chosen`` / ``rejected`` transcripts of "Human:" and
  "Assistant:" turns). Both answers are rendered after the prompt with the chat template;
  only the final answer's tokens (its eos included) are trained. A bad record is an error
  naming the file and line, or with ``skip_bad`` skipped and counted by reason.
* **Batches.** The two answers of a prompt are consecutive rows of one forward pass (rows
  ``2i`` chosen, ``2i + 1`` rejected, as TRL concatenates them), so a micro-batch of
  ``micro_batch`` pairs is ``2 × micro_batch`` rows.
* **Losses.** ``dpo``: Rafailov et al. (2023), ``-log σ(β((log π(c) - log π_ref(c)) -
  (log π(r) - log π_ref(r))))`` with optional label smoothing (conservative DPO), or IPO's
  squared loss (Azar et al. 2023, per-token averaged as TRL does). ``simpo``: Meng et al.
  (2024), reference-free: ``-log σ(β(avg log π(c) - avg log π(r)) - γ)``. SimPO rather than
  ORPO: it needs no reference and no SFT term (a model after LLaMA-I already had its SFT),
  its per-token average removes DPO's length bias, and it beat ORPO in its paper's
  AlpacaEval 2 and Arena-Hard comparisons.
* **The reference.** With LoRA it is the base: the same model with the adapters switched
  off (no second copy). With full finetuning it is the base's log-probabilities of every
  pair, computed in one pass before the first step and stored with the run
  (``OUT/reference_logps.pt``), so resuming never recomputes them.
* **Metrics.** Each metrics row has ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins`` and ``rewards/accuracies`` (TRL's names and definitions) averaged over
  the steps since the last row; the summary has the held-out pairs' preference accuracy
  (the model gives the chosen answer the higher log-probability, per token for SimPO)
  before and after, and held-out exact match of greedy answers against the chosen ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llamaforge import parallel as D
from llamaforge.chat_templates import (
    IGNORE_INDEX,
    ChatTemplate,
    ChatTemplateError,
    load_template,
    tokenize_conversation,
)
from llamaforge.config import ConfigError
from llamaforge.files import atomic_write
from llamaforge.finetune.data import (
    MAX_RECORD_BYTES,
    BadRecord,
    InstructDataError,
    TokenizedExample,
    _epoch_order,
    _Loader,
    _records,
    check_conversation,
    example_is_val,
)
from llamaforge.finetune.run import (
    FinetuneConfig,
    FinetuneTrainer,
    PreferenceSection,
    base_tokenizer,
    generation_eval,
    lora_hooks,
    resolve,
)
from llamaforge.model import ModelArgs
from llamaforge.tokenizer import Tokenizer
from llamaforge.training.trainer import model_args, run_training

__all__ = [
    "PAIR_FORMATS",
    "PairRecord",
    "PreferenceDataset",
    "PreferenceLoader",
    "PreferencePair",
    "PreferenceTrainer",
    "adapters_disabled",
    "build_preference_dataset",
    "preference_accuracy",
    "preference_losses",
    "read_pairs",
    "run_preference",
    "sequence_logps",
    "tokenize_pair",
]

Message = dict[str, str]
PAIR_FORMATS = ("strings", "messages", "hh")


# -- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRecord:
    """A prompt (messages ending with the user's) and its two answers."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str


def detect_pair_format(rec: Mapping[str, Any], where: str) -> str:
    """``strings``, ``messages`` or ``hh`` from a record's keys and value types."""
    if "chosen" not in rec or "rejected" not in rec:
        raise InstructDataError(
            f"{where}: not a preference record: expected 'chosen' and 'rejected' (and "
            f"'prompt'), got keys {sorted(rec)}"
        )
    if isinstance(rec["chosen"], list):
        return "messages"
    return "strings" if "prompt" in rec else "hh"


def _str(rec: Mapping[str, Any], key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise BadRecord(f"bad_{key}", f"{where}: {key!r} must be a non-empty string, got {v!r:.60}")
    return v


def _messages(value: Any, key: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"bad_{key}", f"{where}: {key!r} must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
            raise BadRecord(
                f"bad_{key}", f"{where}: {key!r} holds {m!r:.60}, not a role/content message"
            )
        out.append({"role": str(m.get("role")), "content": m["content"]})
    return out


def _from_strings(rec: Mapping[str, Any], where: str) -> tuple[list[Message], str, str]:
    prompt = [{"role": "user", "content": _str(rec, "prompt", where)}]
    return prompt, _str(rec, "chosen", where), _str(rec, "rejected", where)


def _split_answer(conv: list[Message], key: str, where: str) -> tuple[list[Message], str]:
    if conv[-1]["role"] != "assistant":
        raise BadRecord(f"bad_{key}", f"{where}: {key!r} must end with an assistant message")
    return conv[:-1], conv[-1]["content"]


def _from_messages(rec: Mapping[str, Any], where: str) -> tuple[list[Message], str, str]:
    chosen = _messages(rec["chosen"], "chosen", where)
    rejected = _messages(rec["rejected"], "rejected", where)
    head_c, answer_c = _split_answer(chosen, "chosen", where)
    head_r, answer_r = _split_answer(rejected, "rejected", where)
    if head_c != head_r:
        raise BadRecord(
            "different_prompts", f"{where}: 'chosen' and 'rejected' lead with different prompts"
        )
    if head_c:  # UltraFeedback binarized: the prompt's messages lead each answer
        prompt = head_c
    elif isinstance(rec.get("prompt"), list):  # TRL's conversational form
        prompt = _messages(rec["prompt"], "prompt", where)
    else:
        prompt = [{"role": "user", "content": _str(rec, "prompt", where)}]
    return prompt, answer_c, answer_r


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str, key: str, where: str) -> list[Message]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord(
            f"bad_{key}", f"{where}: {key!r} is not an HH transcript of 'Human:'/'Assistant:' turns"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _from_hh(rec: Mapping[str, Any], where: str) -> tuple[list[Message], str, str]:
    chosen = _hh_turns(_str(rec, "chosen", where), "chosen", where)
    rejected = _hh_turns(_str(rec, "rejected", where), "rejected", where)
    head_c, answer_c = _split_answer(chosen, "chosen", where)
    head_r, answer_r = _split_answer(rejected, "rejected", where)
    if head_c != head_r or not head_c:
        raise BadRecord(
            "different_prompts", f"{where}: 'chosen' and 'rejected' differ before the last answer"
        )
    return head_c, answer_c, answer_r


_PAIR_CONVERTERS = {"strings": _from_strings, "messages": _from_messages, "hh": _from_hh}


def read_pairs(
    path: str | Path,
    format: str = "auto",
    *,
    skip_bad: bool = False,
    split: str = "train",
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> tuple[list[PairRecord], Counter[str], str]:
    """The preference pairs of one file (or ``save_to_disk`` folder), the records skipped
    by reason and the format; a record longer than ``max_record_bytes`` is a bad record,
    never read whole (as for the instruction readers)."""
    if format != "auto" and format not in _PAIR_CONVERTERS:
        raise InstructDataError(
            f"unknown preference format {format!r}; expected 'auto' or one of {list(PAIR_FORMATS)}"
        )
    fmt = "" if format == "auto" else format
    pairs: list[PairRecord] = []
    skipped: Counter[str] = Counter()
    for where, rec in _records(Path(path), split, max_record_bytes):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if not isinstance(rec, Mapping):
                raise BadRecord(
                    "not_an_object", f"{where}: expected a JSON object, got {type(rec).__name__}"
                )
            fmt = fmt or detect_pair_format(rec, where)
            prompt, chosen, rejected = _PAIR_CONVERTERS[fmt](rec, where)
            for answer in (chosen, rejected):
                check_conversation([*prompt, {"role": "assistant", "content": answer}], where)
        except BadRecord as e:
            if not skip_bad:
                raise
            skipped[e.reason] += 1
            continue
        pairs.append(PairRecord(prompt, chosen, rejected, where))
    return pairs, skipped, fmt


# -- tokenized pairs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """The chosen and rejected conversations tokenized; labels only on the final answer."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    source: str


@dataclass
class PreferenceDataset:
    train: list[PreferencePair]
    val: list[PreferencePair]
    val_records: list[PairRecord]
    report: dict[str, Any]


def _final_answer_only(labels: list[int]) -> list[int]:
    """Labels with every trained run but the last one (the final answer) set to -100: the
    prompt's earlier assistant turns are context, not what is preferred."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:]


def tokenize_pair(
    tpl: ChatTemplate, tokenizer: Any, rec: PairRecord, max_len: int, counts: Counter[str]
) -> PreferencePair | None:
    """Both answers rendered after the prompt; longer than ``max_len`` positions they are
    cut at the end (None, counted, when an answer has no trained token left)."""
    sides = []
    for answer in (rec.chosen, rec.rejected):
        messages = [*rec.prompt, {"role": "assistant", "content": answer}]
        ids, labels = tokenize_conversation(tpl, tokenizer, messages)
        labels = _final_answer_only(labels)
        if len(ids) - 1 > max_len:
            ids, labels = ids[: max_len + 1], labels[: max_len + 1]
            counts["truncated"] += 1
            if all(lab == IGNORE_INDEX for lab in labels[1:]):
                counts["dropped_no_target_after_truncation"] += 1
                return None
        sides.append(
            TokenizedExample(
                np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), rec.source
            )
        )
    return PreferencePair(sides[0], sides[1], rec.source)


def build_preference_dataset(cfg: FinetuneConfig, tokenizer: Any) -> PreferenceDataset:
    """Read ``data.paths``, hold out pairs by the hash of their prompt (both answers of a
    prompt on the same side), tokenize; the report counts what was read, skipped, cut."""
    d = cfg.data
    if not d.paths:
        raise InstructDataError("no preference data: set data.paths")
    tpl = load_template(d.template)
    counts: Counter[str] = Counter()
    files: dict[str, Any] = {}
    train: list[PreferencePair] = []
    val: list[PreferencePair] = []
    val_records: list[PairRecord] = []
    for p in d.paths:
        fmt = d.format if d.format in PAIR_FORMATS else "auto"
        pairs, skipped, found = read_pairs(
            p, fmt, skip_bad=d.skip_bad, split=d.split, max_record_bytes=d.max_record_bytes
        )
        files[str(p)] = {"format": found, "pairs": len(pairs), "skipped": dict(skipped)}
        counts.update({f"skipped_{k}": v for k, v in skipped.items()})
        counts["read"] += len(pairs)
        for rec in pairs:
            try:
                pair = tokenize_pair(tpl, tokenizer, rec, d.max_len, counts)
            except ChatTemplateError as e:
                if not d.skip_bad:
                    raise InstructDataError(f"{rec.source}: {e}") from None
                counts["skipped_template"] += 1
                continue
            if pair is None:
                continue
            if example_is_val(rec.prompt, d.val_fraction):
                val.append(pair)
                val_records.append(rec)
            else:
                train.append(pair)
    if not train:
        raise InstructDataError(f"no training pairs left in {d.paths} ({dict(counts)})")
    report = {
        "files": files,
        "counts": dict(counts),
        "train": {"pairs": len(train), "positions": _positions(train)},
        "val": {"pairs": len(val), "positions": _positions(val)},
    }
    return PreferenceDataset(train, val, val_records, report)


def _positions(pairs: Sequence[PreferencePair]) -> int:
    return sum(p.chosen.positions + p.rejected.positions for p in pairs)


# -- batches -------------------------------------------------------------------------------------


def pair_rows(
    pairs: Sequence[PreferencePair], indices: Sequence[int], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(x, y, {"index": …})``: rows ``2i`` and ``2i + 1`` the chosen and rejected answer of
    ``pairs[indices[i]]``, right-padded to the longest (y = -100 on padding and prompts);
    ``index`` gives each row its pair's index (for the stored reference log-probs)."""
    sides = [e for i in indices for e in (pairs[i].chosen, pairs[i].rejected)]
    width = max(e.positions for e in sides)
    x = torch.full((len(sides), width), pad_id, dtype=torch.long)
    y = torch.full((len(sides), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(sides):
        x[r, : e.positions] = torch.from_numpy(e.ids[:-1])
        y[r, : e.positions] = torch.from_numpy(e.labels[1:])
    index = torch.tensor(indices, dtype=torch.long).repeat_interleave(2)
    return x, y, {"index": index}


class PreferenceLoader(_Loader):
    """Global batches of ``global_batch`` pairs in a seeded order per epoch; this rank reads
    its contiguous share as ``pair_rows``. ``offset`` is added to the pair indices (the
    held-out pairs' reference log-probs follow the training pairs')."""

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
        offset: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not pairs:
            raise InstructDataError("no preference pairs to load")
        super().__init__(  # the base's examples: one per pair (the chosen answer's row)
            [p.chosen for p in pairs], global_batch, None, rank=rank, world_size=world_size,
            seed=seed, shuffle=shuffle, pad_id=pad_id, device=device,
        )  # fmt: skip
        self.pairs, self.offset = list(pairs), offset

    def _units(self, epoch: int) -> list[Any]:
        return _epoch_order(len(self.pairs), self.seed, epoch, self.shuffle).tolist()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        idx = self._take()
        x, y, extras = pair_rows(self.pairs, idx, self.pad_id)
        self.real_tokens = sum(self.pairs[i].chosen.positions + self.pairs[i].rejected.positions
                               for i in idx)  # fmt: skip
        extras["index"] += self.offset
        return self._to(x), self._to(y), {k: self._to(v) for k, v in extras.items()}

    def _key(self) -> dict[str, Any]:
        return {**super()._key(), "kind": "preference", "pairs": len(self.pairs)}


# -- losses --------------------------------------------------------------------------------------


def sequence_logps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kw: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its targets (fp32) and their number; the output
    layer runs only at the targets."""
    keep = y != IGNORE_INDEX
    logits = model(x, only=keep, **kw)
    token_logps = -F.cross_entropy(logits.float(), y[keep], reduction="none")
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(y)[keep]
    logps = token_logps.new_zeros(x.shape[0]).index_add(0, rows, token_logps)
    return logps, keep.sum(1)


def preference_losses(
    method: str,
    p: PreferenceSection,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (TRL's definitions) from rows'
    summed log-probs (rows ``2i`` chosen, ``2i + 1`` rejected), their target counts and, for
    DPO, the reference's summed log-probs."""
    lc, lr = logps[0::2], logps[1::2]
    nc, nr = lengths[0::2].clamp(min=1), lengths[1::2].clamp(min=1)
    eps = p.label_smoothing
    if method == "simpo":
        ac, ar = lc / nc, lr / nr
        z = p.beta * (ac - ar - p.gamma / p.beta)
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        return losses, p.beta * ac.detach(), p.beta * ar.detach()
    if method != "dpo" or ref_logps is None:
        raise ValueError(f"method={method!r}: expected dpo (with reference log-probs) or simpo")
    ratio_c, ratio_r = lc - ref_logps[0::2], lr - ref_logps[1::2]
    if p.loss == "ipo":  # per-token averages, as TRL (and IPO's authors) do
        losses = (ratio_c / nc - ratio_r / nr - 1 / (2 * p.beta)) ** 2
    else:
        z = p.beta * (ratio_c - ratio_r)
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    return losses, p.beta * ratio_c.detach(), p.beta * ratio_r.detach()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model: every LoRA layer computes its frozen base only, for the duration."""
    from llamaforge.finetune.lora import LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in layers:
        m.forward = m.base_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in layers:
            del m.forward


# -- the trainer ---------------------------------------------------------------------------------

_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class PreferenceTrainer(FinetuneTrainer):
    """``FinetuneTrainer`` whose loss is ``preference_losses`` over pairs of rows: the
    step's loss is the mean over the global batch's pairs (``target_count``), the reference
    is the base with the adapters off (LoRA) or the base's stored log-probs (full
    finetuning), and each metrics row carries the rewards since the last one."""

    def __init__(
        self, *args: Any, pairs: Sequence[PreferencePair] = (), key: str = "", **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.pairs, self.key = list(pairs), key
        self.method, self.pref = self.cfg.method, self.cfg.preference
        self.reference: torch.Tensor | None = None  # (pairs × 2 rows) of the base's log-probs
        self._stats = torch.zeros(len(_STATS) + 1, dtype=torch.float64, device=self.device)

    def target_count(self, y: torch.Tensor) -> float:
        return float(self.cfg.batch_size)  # pairs in a global batch: the loss is their mean

    def build(self) -> PreferenceTrainer:
        super().build()
        if not self.cfg.lora.enabled:  # before ``resume`` loads trained weights
            self.reference = self._stored_reference()
        return self

    def _stored_reference(self) -> torch.Tensor:
        """The base's log-probs of every pair's two rows: read from OUT/reference_logps.pt
        when it was written for this data and base, else computed (every rank runs the same
        forwards: FSDP2 gathers inside them) and written there."""
        path = self.out / "reference_logps.pt"
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("key") == self.key:
                return stored["logps"].to(self.device)
        logps = self.base_logps(range(len(self.pairs))).view(-1)
        D.barrier()
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"key": self.key, "logps": logps.cpu()}, tmp)
            tmp.replace(path)
        return logps

    @torch.no_grad()
    def base_logps(self, indices: Sequence[int], *, policy: bool = False) -> torch.Tensor:
        """(len(indices), 2) summed log-probs of pairs' chosen and rejected answers under the
        base (adapters off with LoRA; the model as it is at build time otherwise) or, with
        ``policy``, the model as it is now; in micro-batches, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        out = []
        indices = list(indices)
        base = contextlib.nullcontext if policy or not self.cfg.lora.enabled else adapters_disabled
        for i in range(0, len(indices), self.cfg.micro_batch // 2):
            x, y, _ = pair_rows(self.pairs, indices[i : i + self.cfg.micro_batch // 2])
            with base(self.model), self._autocast():
                logps, _ = sequence_logps(self.model, x.to(self.device), y.to(self.device), {})
            out.append(logps.view(-1, 2))
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 2, device=self.device)

    def _reference_logps(
        self, x: torch.Tensor, y: torch.Tensor, kw: dict[str, torch.Tensor], index: torch.Tensor
    ) -> torch.Tensor | None:
        if self.method == "simpo":
            return None
        if self.reference is not None:
            rows = torch.arange(len(index), device=index.device) % 2
            return self.reference.view(-1, 2)[index, rows]
        with torch.no_grad(), adapters_disabled(self.model):
            return sequence_logps(self.model, x, y, kw)[0]

    def _loss(
        self, x: torch.Tensor, y: torch.Tensor, kw: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed per-pair losses of a micro-batch and its pairs; training micro-batches
        add their rewards to the metrics."""
        kw = dict(kw)
        index = kw.pop("index")
        ref = self._reference_logps(x, y, kw, index)
        logps, lengths = sequence_logps(self.model, x, y, kw)
        losses, chosen, rejected = preference_losses(self.method, self.pref, logps, lengths, ref)
        if self.model.training:
            margins = chosen - rejected
            stats = [losses.detach(), chosen, rejected, margins, (margins > 0).float()]
            sums = torch.stack([s.sum().double() for s in stats])
            self._stats += torch.cat([sums, sums.new_full((1,), float(len(losses)))])
        return losses.sum(), torch.tensor(len(losses), device=x.device)

    def _metrics_row(self, loop: Any, lr: float, finite: bool) -> dict[str, Any]:
        row = super()._metrics_row(loop, lr, finite)
        stats = D.all_reduce_sum(self._stats.clone()).tolist()
        self._stats.zero_()
        n = max(1.0, stats[-1])
        row.update({name: value / n for name, value in zip(_STATS[1:], stats[1:])})
        return row

    def fit(self) -> dict[str, Any]:
        results = super().fit()
        results["preference_accuracy"] = self.held_out_accuracy()
        return results

    def held_out_accuracy(self) -> dict[str, Any]:
        """Held-out pairs where the model gives the chosen answer the higher log-probability
        (per token for SimPO), for the base (before) and the model now (after)."""
        val = [i for i in range(len(self.pairs)) if i >= self.n_train]
        if not val:
            return {"n": 0}
        before = (
            self.reference.view(-1, 2)[val] if self.reference is not None else self.base_logps(val)
        )
        after = self.base_logps(val, policy=True)
        trained = torch.tensor(
            [[int((self.pairs[i].chosen.labels[1:] != IGNORE_INDEX).sum()),
              int((self.pairs[i].rejected.labels[1:] != IGNORE_INDEX).sum())] for i in val],
            dtype=torch.float32, device=after.device,
        )  # fmt: skip
        norm = trained if self.method == "simpo" else torch.ones_like(trained)

        def accuracy(lp: torch.Tensor) -> float:
            s = lp.float() / norm
            return float((s[:, 0] > s[:, 1]).float().mean())

        out = {"n": len(val), "before": accuracy(before), "after": accuracy(after)}
        if self.method == "dpo":
            margins = self.pref.beta * ((after - before)[:, 0] - (after - before)[:, 1])
            out["reward_accuracy"] = float((margins > 0).float().mean())
            out["reward_margin"] = float(margins.mean())
        return out

    n_train: int = 0


def _describe(data: PreferenceDataset, cfg: FinetuneConfig) -> str:
    t, v, c = data.report["train"], data.report["val"], data.report["counts"]
    return (
        f"preference data: {t['pairs']} train / {v['pairs']} held-out pairs; method "
        f"{cfg.method}, template {cfg.data.template}, rows of ≤ {cfg.data.max_len}; "
        f"{c.get('truncated', 0)} answers cut; {cfg.steps} steps of {cfg.batch_size} pairs"
    )


def _data_key(cfg: FinetuneConfig, pairs: Sequence[PreferencePair]) -> str:
    """What the stored reference log-probs depend on: the base and every row's tokens."""
    h = hashlib.sha256(json.dumps([str(cfg.init), cfg.dtype]).encode())
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(e.ids.tobytes())
            h.update(e.labels.tobytes())
    return h.hexdigest()


def run_preference(cfg: FinetuneConfig) -> dict[str, Any]:
    """Preference-tune ``cfg.init`` on ``cfg.data`` (``method`` dpo or simpo); returns the
    summary, also written to OUT/summary.json with the held-out evaluation."""
    if cfg.method not in ("dpo", "simpo"):
        raise ConfigError(f"method={cfg.method!r}: preference tuning is dpo or simpo")
    p = cfg.preference
    if p.beta <= 0 or not 0 <= p.label_smoothing < 0.5:
        raise ConfigError(
            f"preference.beta={p.beta}, preference.label_smoothing={p.label_smoothing}: "
            "expected beta > 0 and label_smoothing in [0, 0.5)"
        )
    if cfg.data.packing:
        raise ConfigError("data.packing: preference pairs are padded rows (set packing=false)")
    tok = base_tokenizer(cfg)
    data = build_preference_dataset(cfg, tok)
    info = D.init(cfg.device)
    try:
        cfg = resolve(cfg, len(data.train), info.world_size)
        args = model_args(cfg, tok.vocab_size, cfg.data.max_len)
        summary = _train(cfg, info, args, tok, data)
    finally:
        D.cleanup()
    summary["data"] = data.report
    if info.is_main:
        if (
            cfg.gen_eval > 0
            and data.val_records
            and (summary.get("model") or summary.get("adapter"))
        ):
            summary["evaluation"] = _held_out_answers(cfg, data, summary)
        atomic_write(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
        D.print0(format_preference(summary))
    return summary


def _train(
    cfg: FinetuneConfig, info: D.DistInfo, args: ModelArgs, tok: Tokenizer, data: PreferenceDataset
) -> dict[str, Any]:
    """The run on the shared Trainer: ``micro_batch`` pairs are ``2 × micro_batch`` rows."""
    rows = dataclasses.replace(
        cfg, micro_batch=2 * cfg.micro_batch, batch_tokens=2 * cfg.batch_tokens
    )
    pairs = [*data.train, *data.val]
    loader = PreferenceLoader(data.train, cfg.batch_size, rank=info.rank,
                              world_size=info.world_size, seed=cfg.data.seed,
                              device=info.device)  # fmt: skip
    val_batches = []
    if data.val and cfg.eval_batches > 0:
        for i in range(0, min(len(data.val), cfg.eval_batches * cfg.micro_batch), cfg.micro_batch):
            idx = list(range(i, min(i + cfg.micro_batch, len(data.val))))
            x, y, extras = pair_rows(data.val, idx)
            extras["index"] += len(data.train)
            val_batches.append((x, y, extras))
    trainer = PreferenceTrainer(
        rows,
        info,
        args=args,
        seq_len=cfg.data.max_len,
        loader=loader,
        val_batches=val_batches,
        all_targets_count=False,
        logits_where_trained=False,  # the loss selects its targets itself
        name=cfg.method,
        pairs=pairs,
        key=_data_key(cfg, pairs),
        **lora_hooks(cfg),
    )
    trainer.n_train = len(data.train)
    D.print0(_describe(data, cfg))
    return run_training(trainer, tokenizer=tok, epochs=lambda: loader.epoch)


def _held_out_answers(
    cfg: FinetuneConfig, data: PreferenceDataset, summary: dict[str, Any]
) -> dict[str, Any]:
    """Greedy answers to the first ``gen_eval`` held-out prompts, scored against the chosen
    answers (exact match, token F1), by the base and by the tuned model."""
    held = [
        [*r.prompt, {"role": "assistant", "content": r.chosen}]
        for r in data.val_records[: cfg.gen_eval]
    ]
    base = Path(cfg.init)
    after = Path(summary["model"]) if summary.get("model") else base
    adapter = Path(summary["adapter"]) if not summary.get("model") else None
    n = cfg.gen_max_new_tokens
    return {
        "held_out": {
            "before": generation_eval(base, held, cfg.data.template, n),
            "after": generation_eval(after, held, cfg.data.template, n, adapter),
        }
    }


def format_preference(summary: dict[str, Any]) -> str:
    """The lines a preference run ends with: held-out preference accuracy and answers."""
    lines = []
    acc = summary.get("preference_accuracy") or {}
    if acc.get("n"):
        lines.append(
            f"held-out preference accuracy ({acc['n']} pairs): {acc['before']:.1%} → "
            f"{acc['after']:.1%}"
        )
    ev = summary.get("evaluation", {}).get("held_out")
    if ev:
        b, a = ev["before"], ev["after"]
        lines.append(
            f"held-out answers ({a['n']}): exact match {b['exact_match']:.1%} → "
            f"{a['exact_match']:.1%}, token F1 {b['f1']:.3f} → {a['f1']:.3f}"
        )
    return "\n".join(lines)


@torch.no_grad()
def preference_accuracy(
    ckpt: str | Path,
    records: Sequence[PairRecord],
    template: str,
    *,
    per_token: bool = False,
    batch: int = 32,
) -> float:
    """The fraction of ``records`` to whose chosen answer the checkpoint gives the higher
    log-probability (per token with ``per_token``, SimPO's measure), answers rendered after
    their prompts with ``template``."""
    from llamaforge.checkpoint.native import load
    from llamaforge.device import resolve_device

    model, tok = load(ckpt, device=resolve_device("auto"))
    model.eval()
    tpl = load_template(template)
    max_len = model.args.max_seq_len - 1
    pairs = [p for r in records if (p := tokenize_pair(tpl, tok, r, max_len, Counter()))]
    wins = 0
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch):
        x, y, _ = pair_rows(pairs, list(range(i, min(i + batch, len(pairs)))))
        logps, lengths = sequence_logps(model, x.to(device), y.to(device), {})
        if per_token:
            logps = logps / lengths.clamp(min=1)
        wins += int((logps[0::2] > logps[1::2]).sum())
    return wins / max(1, len(pairs))
