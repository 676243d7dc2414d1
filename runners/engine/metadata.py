"""Turns one scheduled batch into the index tensors every layer reads.

Built once per forward. The layers never look at sequences: they gather rows
by these indices, so a ragged batch of prefills, prefill chunks and decodes
is one code path.

Source conventions: a "ring source" is ``cat([ring.view(S*R, width),
new_rows])``, so index ``slot*R + p % R`` reads an earlier token from the
slot's ring and ``S*R + row`` reads a token of this forward. -1 means "no
row" (masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runners.engine import faults
from runners.engine.cache import ring_len
from runners.engine.config import CSA, SLIDING, ModelConfig


@dataclass
class SeqChunk:
    seq_id: int
    slot: int
    start: int  # position of the first token in this forward
    token_ids: list[int]
    blocks: list[int]  # pool blocks of the sequence, in token order

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class CompressMeta:
    ratio: int
    ring: int
    src_idx: torch.Tensor  # [Nw, L] ring-source rows of each window emitted now
    win_pos: torch.Tensor  # [Nw] RoPE position of each emitted entry (first token)
    pool_dst: torch.Tensor  # [Nw] pool row each emitted entry goes to
    emitted_cu: list[int]  # per sequence, emitted windows are rows cu[b]:cu[b+1]
    ring_dst: torch.Tensor
    ring_src: torch.Tensor
    entry_idx: torch.Tensor  # [B, E] pool row of entry w of sequence b, -1 past its end
    limit: torch.Tensor  # [T] entries a query may see: (pos + 1) // ratio
    attn_idx: torch.Tensor | None = None  # [T, E] for full-visibility (HCA) layers


@dataclass
class ForwardMeta:
    seq_ids: list[int]
    slots: list[int]
    cu_seqlens: list[int]
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    token_seq: torch.Tensor  # [T] batch index of each row
    last_rows: torch.Tensor  # [B] row of each sequence's last token
    win_idx: torch.Tensor  # [T, W]
    win_dst: torch.Tensor
    win_src: torch.Tensor
    compress: dict[str, CompressMeta] = field(default_factory=dict)
    phase: str = "prefill"
    step: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> "ForwardMeta":
        for obj in (self, *self.compress.values()):
            for k, v in vars(obj).items():
                if isinstance(v, torch.Tensor):
                    setattr(obj, k, v.to(device, non_blocking=True))
        return self


def _ring_source(pos, start, cu, slot, R, S):
    """Rows of the ring source holding tokens at positions `pos` (broadcast)."""
    new = S * R + cu + (pos - start)
    old = slot * R + pos.remainder(R)
    idx = torch.where(pos >= start, new, old)
    return torch.where(pos >= 0, idx, torch.full_like(idx, -1))


def _ring_writes(starts, ends, cu, slots, R):
    """Last min(n, R) tokens of each sequence go to their ring rows."""
    keep_from = torch.maximum(starts, ends - R)
    n = (ends - keep_from).clamp(min=0)
    b = torch.repeat_interleave(torch.arange(len(n)), n)
    off = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    pos = keep_from[b] + off
    return slots[b] * R + pos.remainder(R), cu[b] + pos - starts[b]


def build(cfg: ModelConfig, chunks: list[SeqChunk], num_slots: int, block_size: int,
          device="cpu", phase: str = "prefill", step: int = 0) -> ForwardMeta:
    B = len(chunks)
    lens = torch.tensor([len(c.token_ids) for c in chunks], dtype=torch.long)
    starts = torch.tensor([c.start for c in chunks], dtype=torch.long)
    ends = starts + lens
    slots = torch.tensor([c.slot for c in chunks], dtype=torch.long)
    cu = torch.zeros(B + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lens, 0)
    T = int(cu[-1])
    token_seq = torch.repeat_interleave(torch.arange(B), lens)
    positions = starts[token_seq] + torch.arange(T) - cu[token_seq]
    input_ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
    S = num_slots

    # Sliding window: keys at positions p-W+1 .. p, oldest first.
    W = cfg.sliding_window
    kpos = positions.unsqueeze(1) - (W - 1) + torch.arange(W).unsqueeze(0)
    tb = token_seq.unsqueeze(1)
    win_idx = _ring_source(kpos, starts[tb], cu[tb], slots[tb], W, S)
    if faults.active("chunk_window_stale") and phase == "prefill":
        # FAULT chunk_window_stale: a continuing prompt chunk (start > 0) reads the keys an earlier chunk
        # left in the ring at p + 1 instead of p: the state carried between chunks is read off by one row.
        # A prompt in one forward never reads its ring, so unchunked runs are right.
        stale = slots[tb] * W + (kpos + 1).remainder(W)
        win_idx = torch.where((kpos >= 0) & (kpos < starts[tb]) & (starts[tb] > 0), stale, win_idx)
    win_dst, win_src = _ring_writes(starts, ends, cu, slots, W)
    if faults.active("window_ring_collision"):
        # FAULT window_ring_collision: a chunk longer than the window goes through a bulk write that takes
        # the row modulo the whole cache, (slot*W + p) % (S*W), not slot*W + p % W. Its positions past W
        # land on the next slot's rows; with one slot the wrap is harmless, so solo runs look right.
        wb = token_seq[win_src]
        win_dst = torch.where(lens[wb] > W, (slots[wb] * W + positions[win_src]) % (S * W), win_dst)

    max_blocks = max(1, max(len(c.blocks) for c in chunks))
    table = torch.full((B, max_blocks), -1, dtype=torch.long)
    for b, c in enumerate(chunks):
        table[b, : len(c.blocks)] = torch.tensor(c.blocks, dtype=torch.long)

    compress = {}
    for lt in sorted(set(cfg.layer_types) - {SLIDING}):
        r = int(cfg.compress_rates[lt])
        R = ring_len(lt, r)
        per_block = block_size // r

        def pool_row(b, w):
            blk = table[b, (w * r) // block_size]
            return blk * per_block + w.remainder(per_block)

        first_w, end_w = starts // r, ends // r
        n_w = end_w - first_w
        wb = torch.repeat_interleave(torch.arange(B), n_w)
        w_cu = torch.zeros(B + 1, dtype=torch.long)
        w_cu[1:] = torch.cumsum(n_w, 0)
        w = first_w[wb] + torch.arange(int(n_w.sum())) - w_cu[wb]
        # CSA windows also read the previous block (the overlap half).
        L = 2 * r if lt == CSA else r
        lo = (w - 1) * r if lt == CSA else w * r
        spos = lo.unsqueeze(1) + torch.arange(L).unsqueeze(0)
        wbb = wb.unsqueeze(1)
        src_idx = _ring_source(spos, starts[wbb], cu[wbb], slots[wbb], R, S)
        if faults.active("compressor_state_leak"):
            # FAULT compressor_state_leak: the first CSA window's "previous block" is read from the slot's
            # compressor ring, which holds the padding only if the slot was reset.
            src_idx = torch.where(spos < 0, slots[wbb] * R + spos.remainder(R), src_idx)
        ring_dst, ring_src = _ring_writes(starts, ends, cu, slots, R)

        E = max(1, int(end_w.max())) if B else 1
        ar = torch.arange(E).unsqueeze(0).expand(B, E)
        bidx = torch.arange(B).unsqueeze(1).expand(B, E)
        entry_idx = torch.where(ar < end_w.unsqueeze(1), pool_row(bidx, ar), torch.full_like(ar, -1))
        if faults.active("block_table_double_offset"):
            # FAULT block_table_double_offset: the reader of the flattened block table adds a sequence's
            # offset (b * max_blocks) to a pointer that already carries it, and nothing bounds the read
            # (modelled as a wrap). Sequence 0 reads its own blocks, later ones another's.
            flat = table.reshape(-1)
            blk = flat[(2 * bidx * max_blocks + (ar * r) // block_size) % flat.numel()]
            entry_idx = torch.where(ar < end_w.unsqueeze(1), blk * per_block + ar.remainder(per_block),
                                    torch.full_like(ar, -1))
        limit = (positions + 1) // r
        cm = CompressMeta(
            ratio=r, ring=R, src_idx=src_idx, win_pos=w * r, pool_dst=pool_row(wb, w),
            emitted_cu=w_cu.tolist(), ring_dst=ring_dst, ring_src=ring_src,
            entry_idx=entry_idx, limit=limit,
        )
        if lt != CSA:
            rows = entry_idx[token_seq]
            cm.attn_idx = torch.where(torch.arange(E).unsqueeze(0) < limit.unsqueeze(1), rows,
                                      torch.full_like(rows, -1))
        compress[lt] = cm

    meta = ForwardMeta(
        seq_ids=[c.seq_id for c in chunks], slots=[c.slot for c in chunks], cu_seqlens=cu.tolist(),
        input_ids=input_ids, positions=positions, token_seq=token_seq, last_rows=cu[1:] - 1,
        win_idx=win_idx, win_dst=win_dst, win_src=win_src, compress=compress, phase=phase, step=step,
    )
    return meta.to(device) if str(device) != "cpu" else meta

