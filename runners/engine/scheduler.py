"""Continuous batching: which tokens of which requests run in the next forward.

Every request is "tokens so far" (prompt + generated) and "how many of them
are already in the cache". A forward feeds each scheduled request its next
uncached tokens: a whole prompt, a chunk of one, or the last sampled token
(decode) — one rule for all three. Requests join when a slot and enough
blocks are free and leave as soon as they finish, between any two steps.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from runners.engine.cache import CacheManager
from runners.engine.errors import ParityError
from runners.engine.sampling import SamplingParams


@dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens already in the cache
    finished: bool = False
    finish_reason: str | None = None
    text: str = ""
    generator: torch.Generator | None = None
    seq_index: int | None = None  # the prompt's index in generate(); capture's seq_id

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int | None = None):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk or max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, req: Request) -> None:
        total = len(req.prompt_ids) + req.params.max_new_tokens
        if total > self.cache.max_model_len:
            raise ParityError(f"request {req.request_id}: prompt {len(req.prompt_ids)} + max_new_tokens "
                              f"{req.params.max_new_tokens} exceeds max_model_len {self.cache.max_model_len}")
        if self.cache.blocks_needed(req.request_id, total) > self.cache.cache.num_blocks:
            raise ParityError(f"request {req.request_id} needs more cache blocks than the pool has")
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """(request, number of tokens) for the next forward; running requests first."""
        budget = self.max_num_batched_tokens
        batch = []
        for req in self.running:
            n = min(req.num_tokens - req.num_computed, budget, self.prefill_chunk)
            if n > 0:
                batch.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # Blocks for the whole request are taken on admission, so a running
            # request never runs out of cache mid-generation.
            need = len(req.prompt_ids) + req.params.max_new_tokens
            if not self.cache.can_admit(need):
                break
            self.waiting.popleft()
            self.cache.allocate(req.request_id)
            self.cache.ensure(req.request_id, need)
            self.running.append(req)
            n = min(len(req.prompt_ids), budget, self.prefill_chunk)
            batch.append((req, n))
            budget -= n
        return batch

    def abort(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
            req.finished, req.finish_reason = True, "abort"
        elif req in self.running:
            self.finish(req, "abort")

    def finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
        self.running.remove(req)
        self.cache.free(req.request_id)
