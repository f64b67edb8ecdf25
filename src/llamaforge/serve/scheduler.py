"""The serving engine's scheduler: which requests compute which tokens in each step.

Requests wait in a queue, then prefill (their prompt, in chunks), then decode (one token a
step, or a draft's lookahead). Each step
  1. reserves every decoding request a slot for its next token (with a draft that
     speculates, ``draft_k`` more for its proposals);
  2. gives the prefilling requests, oldest first, chunks within the step's token budget
     (``prefill_chunk``), then admits waiting requests while the budget, ``max_batch`` and
     the pool allow: each first takes the longest cached prefix of its tokens
     (`BlockManager.match`) and prefills only the rest. The engine runs all of a step's
     chunks in one forward.

Memory is taken as tokens arrive. When the pool runs out, the newest request holding
blocks (prefilling or decoding; the largest id) is preempted: its blocks are released and
it goes back to the front of the queue, to recompute its prompt and the tokens it has
generated (much of which its released blocks, still cached by hash, usually give back) and
resume where it left off. The oldest request therefore always progresses, and since the
engine refuses at submit any request that alone cannot fit in the pool, every request ends:
no crash, no hang. No request is admitted in a step that preempted one, nor when admitting
would leave fewer free blocks than there are decoding rows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llamaforge.serve.kv_cache import BlockManager, BlockTable, blocks_for

__all__ = ["Scheduler", "Seq", "StepPlan"]


@dataclass(kw_only=True, eq=False)
class Seq:
    """What the scheduler knows of a request: its tokens (``prompt`` and ``generated``, the
    last generated one not yet fed to the model while it decodes), how many have keys and
    values in the cache (``cached``), its blocks, and whether it may take a cached prefix
    (not while its prompt's logprobs are wanted: they need every prompt position's
    logits)."""

    id: int
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    cached: int = 0
    table: BlockTable = field(default_factory=BlockTable)
    match_prefix: bool = True
    admitted: int = 0  # how many times it left the queue
    preempted: int = 0

    @property
    def target(self) -> int:
        """The tokens a prefill computes: the prompt and every generated token."""
        return len(self.prompt) + len(self.generated)

    def tokens(self) -> list[int]:
        return self.prompt + self.generated


@dataclass
class StepPlan:
    """One step's work: the rows to decode (their slots reserved), the prefill chunks
    ``(seq, start, end)``, and what the step admitted and preempted."""

    decode: list[Seq] = field(default_factory=list)
    prefill: list[tuple[Seq, int, int]] = field(default_factory=list)
    admitted: list[Seq] = field(default_factory=list)
    preempted: list[Seq] = field(default_factory=list)
    speculate: bool = False


class Scheduler:
    """Waiting, prefilling and running requests over one `BlockManager`."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_batch: int,
        prefill_chunk: int,
        draft_k: int = 0,
        draft_max_batch: int | None = None,
    ) -> None:
        self.blocks = blocks
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.draft_k = draft_k
        self.draft_max_batch = draft_max_batch or max_batch
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []
        self.running: list[Seq] = []  # decoding
        self.preemptions = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def needed(self, prompt: int, max_tokens: int) -> int:
        """Blocks a request of ``prompt`` tokens generating ``max_tokens`` holds at most:
        every token but its last is fed to the model, plus a draft's lookahead."""
        return blocks_for(prompt + max(max_tokens, 1) - 1 + self.draft_k, self.blocks.block_size)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Seq) -> None:
        """Take ``seq`` out, wherever it is, and release its blocks."""
        for group in (self.running, self.prefilling):
            if seq in group:
                group.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)

    def started(self, seq: Seq) -> None:
        """``seq``'s prefill is done: it decodes from the next step."""
        self.prefilling.remove(seq)
        self.running.append(seq)

    def commit(self, seq: Seq) -> None:
        """Key ``seq``'s blocks now full of computed tokens (prefix caching)."""
        self.blocks.commit(seq.table, seq.tokens(), seq.cached)

    def schedule(self) -> StepPlan:
        """Reserve this step's slots, preempting when the pool is short (see the module's
        docstring); the plan the engine runs."""
        plan = StepPlan()
        n = len(self.running)
        plan.speculate = self.draft_k > 0 and 0 < n <= self.draft_max_batch
        ahead = self.draft_k if plan.speculate else 0
        for seq in sorted(self.running, key=lambda s: s.id):
            if seq in self.running and self._grow(seq, seq.cached + 1 + ahead, plan):
                plan.decode.append(seq)
        budget = self.prefill_chunk
        for seq in sorted(self.prefilling, key=lambda s: s.id):
            if budget <= 0:
                break
            end = min(seq.target, seq.cached + budget)
            if seq in self.prefilling and self._grow(seq, end, plan):
                plan.prefill.append((seq, seq.cached, end))
                budget -= end - seq.cached
        if not plan.preempted:
            self._admit(plan, budget)
        # a request preempted after its slots were reserved does not run
        plan.decode = [s for s in plan.decode if s in self.running]
        plan.prefill = [c for c in plan.prefill if c[0] in self.prefilling]
        return plan

    def _grow(self, seq: Seq, tokens: int, plan: StepPlan) -> bool:
        """Give ``seq`` blocks for ``tokens`` positions, preempting the newest requests until
        they fit; False when ``seq`` itself had to go."""
        while not self.blocks.allocate(seq.table, tokens):
            victim = max(self.running + self.prefilling, key=lambda s: s.id)
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Seq) -> None:
        self.remove(seq)
        seq.cached = 0
        seq.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, plan: StepPlan, budget: int) -> None:
        """Admit waiting requests, first come first served, while they fit; one whose first
        block is being computed by a prefilling request waits for it (`_follows`)."""
        blocks = self.blocks
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) + len(self.prefilling) >= self.max_batch:
                return
            if self._follows(seq):
                continue
            tokens = seq.tokens()
            found = blocks.match(seq.table, tokens) if seq.match_prefix else 0
            end = min(seq.target, found + budget)
            need = blocks_for(end, blocks.block_size) - len(seq.table.blocks)
            if blocks.available - need < len(self.running) or not blocks.allocate(seq.table, end):
                blocks.free(seq.table)  # the matched prefix too: try again next step
                return
            if seq.match_prefix:
                blocks.record(len(tokens), found)
            self.waiting.remove(seq)
            seq.cached = found
            seq.admitted += 1
            self.prefilling.append(seq)
            plan.admitted.append(seq)
            plan.prefill.append((seq, found, end))
            budget -= end - found

    def _follows(self, seq: Seq) -> bool:
        """Whether ``seq`` should wait for a prefilling request that starts with the same
        block (the ``n`` choices of one prompt, a burst of requests with one system prompt):
        once that one's blocks are computed and cached, ``seq`` takes them instead of
        computing the same tokens beside it."""
        bs = self.blocks.block_size
        if not (self.blocks.prefix_cache and seq.match_prefix) or len(seq.prompt) <= bs:
            return False
        head = seq.prompt[:bs]
        return any(
            o.match_prefix and o.table.extra == seq.table.extra and o.prompt[:bs] == head
            for o in self.prefilling
        )
