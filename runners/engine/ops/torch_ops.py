"""Reference (torch) implementations of the engine's hot ops.

These define what each op computes; other backends must agree with them.
Every op works on flat token rows ``[T, ...]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runners.engine import faults
from runners.engine.ops import invariant as inv
from runners.engine.ops import register

# Gathered attention keys are [T, K, D]; bound one chunk's size so long
# prefills do not materialise T*K*D at once.
_GATHER_BUDGET = 1 << 24


def _row_chunks(n_rows: int, per_row: int):
    step = max(1, _GATHER_BUDGET // max(per_row, 1))
    for s in range(0, n_rows, step):
        yield s, min(n_rows, s + step)


@register("rmsnorm", "torch")
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * _inv_rms(h, eps)).to(x.dtype)


@register("rmsnorm_unweighted", "torch")
def rmsnorm_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * _inv_rms(x.float(), eps).to(x.dtype)


def _inv_rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(h^2) + eps) over the last dim of fp32 h, kept as [..., 1]."""
    return inv.rsqrt(inv.mean(h * h, -1, keepdim=True) + eps)


@register("rope", "torch")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing ``2 * cos.shape[-1]`` channels.

    ``cos``/``sin`` hold one angle per channel pair and must broadcast against
    ``x[..., ::2]``; pass ``-sin`` for the inverse rotation. The rotation runs
    in fp32 and casts back, so fp32 results are bitwise those of the
    reference's ``x*cos + rotate_half(x)*sin`` form.
    """
    rd = 2 * cos.shape[-1]
    nope, r = x[..., :-rd], x[..., -rd:].float()
    x1, x2 = r[..., 0::2], r[..., 1::2]
    c, s = cos.float(), sin.float()
    rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return torch.cat([nope, rot.to(x.dtype)], dim=-1)


@register("sparse_attention", "torch")
def sparse_attention(q, sources, sinks, scale):
    """Attention of each query row over KV rows picked by index.

    q: [T, H, D]. sources: list of (src [N, D], idx [T, K]) with idx -1 for
    "no entry". Keys and values are the same rows (shared-KV MQA). The
    per-head sink joins the softmax denominator and carries no value.

    Each row attends over its own width (up to its last valid entry in each
    source), not the batch's widest: a softmax or matmul over a longer,
    -inf-padded row sums in another order, so a sequence would compute
    differently in a batch than alone.
    """
    T, H, D = q.shape
    out = q.new_empty(T, H, D)
    if T == 0:
        return out
    widths = []
    for _, idx in sources:
        cols = torch.arange(1, idx.shape[1] + 1, device=idx.device)
        widths.append(torch.where(idx >= 0, cols, 0).amax(dim=1) if idx.shape[1] else
                      torch.zeros(T, dtype=torch.long, device=idx.device))
    key = torch.zeros(T, dtype=torch.long, device=q.device)
    for w, (_, idx) in zip(widths, sources):
        key = key * (idx.shape[1] + 1) + w
    sink = sinks.float().view(1, H, 1)
    for group_key in torch.unique(key).tolist():
        rows_all = (key == group_key).nonzero().squeeze(1)
        ws = [int(w[rows_all[0]]) for w in widths]
        k_total = max(1, sum(ws))
        for s, e in _row_chunks(rows_all.numel(), k_total * D):
            rows = rows_all[s:e]
            keys, masks = [], []
            for (src, idx), w in zip(sources, ws):
                i = idx[rows, :w]
                keys.append(src[i.clamp(min=0)])
                masks.append(i < 0)
            kv = torch.cat(keys, dim=1)  # [t, K, D]
            invalid = torch.cat(masks, dim=1)
            logits = inv.matmul(q[rows], kv.transpose(1, 2)) * scale  # [t, H, K], in the activation dtype
            logits = logits.masked_fill(invalid.unsqueeze(1), float("-inf"))
            # the fp32 sink promotes the softmax to fp32, as in the reference
            logits = torch.cat([logits.float(), sink.expand(rows.numel(), H, 1)], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            probs = inv.softmax(logits, dim=-1)[..., :-1]
            # masked keys are another sequence's rows (or stale ones): zero, so that
            # nothing of theirs reaches this row, not even through rounding
            out[rows] = inv.matmul(probs.to(kv.dtype), kv.masked_fill(invalid.unsqueeze(-1), 0))
    return out


@register("compressor_pool", "torch")
def compressor_pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated softmax pooling of one window per row: [N, L, d] -> [N, d].

    The softmax runs over the L source tokens of each channel in fp32; slots
    with gate -inf (before the first token) get weight 0.
    """
    return inv.sum(kv * inv.softmax(gate, dim=1, dtype=torch.float32).to(kv.dtype), dim=1)


@register("indexer_topk", "torch")
def indexer_topk(q, weights, key_src, entry_idx, token_seq, limit, k, softmax_scale):
    """Lightning-indexer scores and top-k per query row.

    q: [T, Hi, d]; weights: [T, Hi] (already scaled); key_src: [N, d] pool
    rows; entry_idx: [B, E] pool row of each sequence's compressed entry
    (-1 past the end); token_seq: [T] sequence of each query; limit: [T]
    number of entries each query may see (causality). Returns entry numbers
    [T, min(k, E)], sorted by score, -1 where fewer entries are visible.
    """
    T = q.shape[0]
    E = entry_idx.shape[1]
    kk = min(k, E)
    out = torch.full((T, kk), -1, dtype=torch.long, device=q.device)
    if kk == 0 or T == 0:
        return out
    keys = key_src[entry_idx.clamp(min=0)].float()  # [B, E, d]
    # Each sequence is scored over its own entries only, as the reference
    # scores one sequence: a batch-wide width would change the matmul's shape,
    # and with it the rounding that decides near-ties in the top-k.
    ar = torch.arange(E, device=q.device)
    n_entries = (entry_idx >= 0).sum(dim=1)
    for b in torch.unique(token_seq).tolist():
        width = int(n_entries[b])
        if width == 0:
            continue
        rows_all = (token_seq == b).nonzero().squeeze(1)
        kw = min(kk, width)
        for s, e in _row_chunks(rows_all.numel(), width * q.shape[1]):
            rows = rows_all[s:e]
            kt = keys[b, :width].unsqueeze(0).expand(rows.numel(), -1, -1)  # [t, width, d]
            scores = inv.matmul(q[rows].float(), kt.transpose(1, 2))  # [t, Hi, width]
            scores = F.relu(scores) * softmax_scale
            scores = inv.sum(scores * weights[rows].float().unsqueeze(-1), dim=1)  # [t, width]
            lim = limit[rows].unsqueeze(-1)
            scores = scores.masked_fill(ar[:width].view(1, -1) >= lim, float("-inf"))
            top = scores.topk(kw, dim=-1).indices
            out[rows, :kw] = torch.where(top >= lim, torch.full_like(top, -1), top)
    return out


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return inv.linear(x, weight)


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return inv.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


@register("fused_moe", "torch")
def fused_moe(x, ids, weights, w13, w2, limit, expert_fn=None):
    """Routed experts: token rows grouped by expert, each expert run once.

    x: [T, D]; ids, weights: [T, k]; w13: [E, 2I, D] (gate rows then up
    rows); w2: [E, D, I]. A token's expert outputs are added in ascending
    expert order, the order the reference accumulates them in.
    ``expert_fn(e, rows) -> out`` replaces the dense expert math (quantized
    experts pass their own).
    """
    T, k = ids.shape
    D = x.shape[-1]
    if T == 0:
        return x.new_zeros(0, D)
    ids_sorted, slot_perm = ids.sort(dim=1, stable=True)
    w_sorted = weights.gather(1, slot_perm)
    flat = ids_sorted.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0] if w13 is not None else 0).tolist()
    rows = x[order // k]
    y = x.new_empty(T * k, D)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        seg = rows[start : start + n]
        if expert_fn is None:
            y[start : start + n] = inv.linear(swiglu(inv.linear(seg, w13, index=e), limit), w2, index=e)
        else:
            y[start : start + n] = expert_fn(e, seg)
        start += n
    pairs = torch.empty_like(y)
    pairs[order] = y
    pairs = pairs.view(T, k, D) * w_sorted.unsqueeze(-1).to(y.dtype)
    return inv.sum(pairs, dim=1)


@register("hc_sinkhorn", "torch")
def hc_sinkhorn(streams, fn, base, scale, iters: int, eps: float, norm_eps: float):
    """Hyper-connection mapping: (pre, post, comb) from the hc streams.

    streams: [T, hc, D]. comb is projected towards doubly stochastic by
    alternating column/row normalisation (Sinkhorn-Knopp), in fp32.
    """
    hc = streams.shape[1]
    flat = rmsnorm_unweighted(streams.flatten(start_dim=1).float(), norm_eps)
    pre_w, post_w, comb_w = inv.linear(flat, fn).split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = scale.unbind(0)
    pre = inv.sigmoid(pre_w * pre_s + pre_b) + eps
    post = 2 * inv.sigmoid(post_w * post_s + post_b)
    comb = inv.softmax(comb_w.view(-1, hc, hc) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
    low = faults.active("sinkhorn_bf16")
    if low:
        # FAULT sinkhorn_bf16: the softmax output is normalised in the activation dtype (a bf16 Sinkhorn
        # shared with other code) and cast back to fp32; every row and column sum rounds to bf16.
        comb = comb.to(streams.dtype)
    comb = comb / (inv.sum(comb, dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (inv.sum(comb, dim=-1, keepdim=True) + eps)
        comb = comb / (inv.sum(comb, dim=-2, keepdim=True) + eps)
    if low:
        comb = comb.float()
    return pre, post, comb
