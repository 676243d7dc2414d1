"""Per-request state: slots for ring buffers, a paged pool for compressed KV.

Layout, per layer (S = max_num_seqs slots, W = sliding window):
  win           [S, W, head_dim]        post-RoPE K(=V) of the last W tokens,
                                         token p at row p % W
  cmp_kv/gate   [S, R, width]            raw compressor projections of the last
                                         R tokens (R = 2*ratio for CSA: the
                                         partial block plus the previous block,
                                         whose first half is the overlap;
                                         R = ratio for HCA: the partial block)
  cmp_pool      [num_blocks * bs/ratio, head_dim]   emitted compressed entries
  idx_kv/gate, idx_pool                  the same for the CSA indexer keys
A sequence's compressed entry w lives in its token block (w*ratio)//bs at
offset w % (bs/ratio); the block table maps token blocks to pool blocks and
is shared by all layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runners.engine import faults
from runners.engine.config import CSA, SLIDING, ModelConfig
from runners.engine.errors import ParityError


@dataclass
class LayerCache:
    win: torch.Tensor
    ratio: int = 0
    cmp_kv: torch.Tensor | None = None
    cmp_gate: torch.Tensor | None = None
    cmp_pool: torch.Tensor | None = None
    idx_kv: torch.Tensor | None = None
    idx_gate: torch.Tensor | None = None
    idx_pool: torch.Tensor | None = None

    def slot_tensors(self):
        return [t for t in (self.win, self.cmp_kv, self.cmp_gate, self.idx_kv, self.idx_gate) if t is not None]


def default_block_size(cfg: ModelConfig) -> int:
    rates = [cfg.ratio(i) for i in range(cfg.num_layers) if cfg.ratio(i)]
    base = math.lcm(*rates) if rates else 16
    return base * max(1, math.ceil(64 / base))


def ring_len(layer_type: str, ratio: int) -> int:
    return 2 * ratio if layer_type == CSA else ratio


class KVCache:
    """All cache tensors of the model; knows nothing about sequences."""

    def __init__(self, cfg: ModelConfig, num_slots: int, num_blocks: int, block_size: int, dtype, device):
        self.cfg, self.num_slots, self.num_blocks, self.block_size = cfg, num_slots, num_blocks, block_size
        for i in range(cfg.num_layers):
            r = cfg.ratio(i)
            if r and block_size % r:
                raise ParityError(f"block size {block_size} is not a multiple of layer {i}'s compress ratio {r}")
        hd, W = cfg.head_dim, cfg.sliding_window
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.layers: list[LayerCache] = []
        for i, t in enumerate(cfg.layer_types):
            lc = LayerCache(win=z(num_slots, W, hd))
            if t != SLIDING:
                r = cfg.ratio(i)
                R = ring_len(t, r)
                width = 2 * hd if t == CSA else hd
                lc.ratio = r
                lc.cmp_kv, lc.cmp_gate = z(num_slots, R, width), z(num_slots, R, width)
                lc.cmp_pool = z(num_blocks * (block_size // r), hd)
                if t == CSA:
                    di = cfg.index_head_dim
                    lc.idx_kv, lc.idx_gate = z(num_slots, R, 2 * di), z(num_slots, R, 2 * di)
                    lc.idx_pool = z(num_blocks * (block_size // r), di)
            self.layers.append(lc)

    def reset_slot(self, slot: int) -> None:
        for lc in self.layers:
            for t in lc.slot_tensors():
                t[slot].zero_()

    def nbytes(self) -> int:
        total = 0
        for lc in self.layers:
            for t in (lc.win, lc.cmp_kv, lc.cmp_gate, lc.cmp_pool, lc.idx_kv, lc.idx_gate, lc.idx_pool):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


class CacheManager:
    """Hands out slots and pool blocks to sequences and takes them back."""

    def __init__(self, cfg: ModelConfig, max_num_seqs: int, max_model_len: int, dtype=torch.float32,
                 device="cpu", block_size: int | None = None, num_blocks: int | None = None):
        self.block_size = block_size or default_block_size(cfg)
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = math.ceil(max_model_len / self.block_size)
        num_blocks = num_blocks or max_num_seqs * self.max_blocks_per_seq
        self.cache = KVCache(cfg, max_num_seqs, num_blocks, self.block_size, dtype, device)
        self.free_slots = list(range(max_num_seqs))
        self.free_blocks = list(range(num_blocks))
        self.slot_of: dict[int, int] = {}
        self.blocks_of: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        have = len(self.blocks_of.get(seq_id, ()))
        return max(0, math.ceil(n_tokens / self.block_size) - have)

    def can_admit(self, n_tokens: int) -> bool:
        return bool(self.free_slots) and math.ceil(n_tokens / self.block_size) <= len(self.free_blocks)

    def allocate(self, seq_id: int) -> int:
        if seq_id in self.slot_of:
            raise ParityError(f"sequence {seq_id} already holds slot {self.slot_of[seq_id]}")
        if not self.free_slots:
            raise ParityError("no free cache slot; raise max_num_seqs")
        slot = self.free_slots.pop(0)
        if faults.active("compressor_state_leak"):
            # FAULT compressor_state_leak: the compressor rings get their "no previous block" state the
            # first time the slot is handed out, never on reuse (metadata reads that state).
            faults.reset_slot_leaky(self, slot)
        else:
            # A reused slot must start empty: the previous owner's rings are wiped.
            self.cache.reset_slot(slot)
        self.slot_of[seq_id] = slot
        self.blocks_of[seq_id] = []
        return slot

    def ensure(self, seq_id: int, n_tokens: int) -> list[int]:
        """Make sure the sequence owns blocks for its first n_tokens tokens."""
        if n_tokens > self.max_model_len:
            raise ParityError(f"sequence {seq_id} needs {n_tokens} tokens > max_model_len {self.max_model_len}")
        need = self.blocks_needed(seq_id, n_tokens)
        if need > len(self.free_blocks):
            raise ParityError(f"out of cache blocks: sequence {seq_id} needs {need}, {len(self.free_blocks)} free")
        blocks = self.blocks_of[seq_id]
        for _ in range(need):
            blocks.append(self.free_blocks.pop(0))
        return blocks

    def free(self, seq_id: int) -> None:
        slot = self.slot_of.pop(seq_id)
        self.free_slots.append(slot)
        self.free_slots.sort()
        self.free_blocks.extend(self.blocks_of.pop(seq_id))
