"""Reference (torch) implementations of the engine's hot ops.

These define what each op computes; other backends must agree with them.
Every op works on flat token rows ``[T, ...]``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from runners.engine import faults
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
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@register("rmsnorm_unweighted", "torch")
def rmsnorm_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


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
            logits = torch.bmm(q[rows], kv.transpose(1, 2)) * scale  # [t, H, K], in the activation dtype
            logits = logits.masked_fill(invalid.unsqueeze(1), float("-inf"))
            # the fp32 sink promotes the softmax to fp32, as in the reference
            logits = torch.cat([logits.float(), sink.expand(rows.numel(), H, 1)], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            probs = torch.softmax(logits, dim=-1)[..., :-1]
            out[rows] = torch.bmm(probs.to(kv.dtype), kv)
    return out


@register("compressor_pool", "torch")
def compressor_pool(kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated softmax pooling of one window per row: [N, L, d] -> [N, d].

    The softmax runs over the L source tokens of each channel in fp32; slots
    with gate -inf (before the first token) get weight 0.
    """
    return (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(dim=1)


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
            scores = torch.matmul(q[rows].float(), kt.transpose(1, 2))  # [t, Hi, width]
            scores = F.relu(scores) * softmax_scale
            scores = (scores * weights[rows].float().unsqueeze(-1)).sum(dim=1)  # [t, width]
            lim = limit[rows].unsqueeze(-1)
            scores = scores.masked_fill(ar[:width].view(1, -1) >= lim, float("-inf"))
            top = scores.topk(kw, dim=-1).indices
            out[rows, :kw] = torch.where(top >= lim, torch.full_like(top, -1), top)
    return out


# Batch invariance: a GEMM library picks its kernel (and so its summation
# order) from the number of rows, so a token's result would depend on how many
# other tokens share the forward. Feeding every GEMM fixed blocks of
# _ROW_BLOCK rows makes each row's result independent of the batch, which is
# what lets `parity slot-invariance` demand bitwise equality of this engine.
# On by default on the CPU (cheap there); PARITY_ENGINE_BATCH_INVARIANT=1|0
# forces it on or off on every device.
_ROW_BLOCK = 64
_BI_SETTING = os.environ.get("PARITY_ENGINE_BATCH_INVARIANT", "auto").strip().lower()


def _batch_invariant(x: torch.Tensor) -> bool:
    if _BI_SETTING in ("1", "true", "on", "yes"):
        return True
    if _BI_SETTING in ("0", "false", "off", "no"):
        return False
    return x.device.type == "cpu"


def row_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear (x in weight's dtype), batch-invariant per row when enabled."""
    x = x.to(weight.dtype)
    if not _batch_invariant(x):
        return F.linear(x, weight)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    n = rows.shape[0]
    if n == 0:
        return x.new_empty(*lead, weight.shape[0])
    pad = (-n) % _ROW_BLOCK
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, k)])
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    wt = weight.t()
    for s in range(0, rows.shape[0], _ROW_BLOCK):
        torch.mm(rows[s:s + _ROW_BLOCK], wt, out=out[s:s + _ROW_BLOCK])
    return out[:n].view(*lead, weight.shape[0])


def lane_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid whose value does not depend on where a row sits in the batch.

    The CPU kernel runs a vectorised exp on full vector lanes and a scalar exp
    on the leftover tail, and the two round differently; with few columns
    ([T, hc]) which elements fall in the tail depends on T. Padding each row
    to 16 columns keeps every element on the vector path."""
    cols = x.shape[-1]
    if x.device.type != "cpu" or cols % 16 == 0:
        return torch.sigmoid(x)
    padded = F.pad(x, (0, (-cols) % 16))
    return torch.sigmoid(padded)[..., :cols]


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return row_linear(x, weight)


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


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
            y[start : start + n] = row_linear(swiglu(row_linear(seg, w13[e]), limit), w2[e])
        else:
            y[start : start + n] = expert_fn(e, seg)
        start += n
    pairs = torch.empty_like(y)
    pairs[order] = y
    pairs = pairs.view(T, k, D) * w_sorted.unsqueeze(-1).to(y.dtype)
    return pairs.sum(dim=1)


@register("hc_sinkhorn", "torch")
def hc_sinkhorn(streams, fn, base, scale, iters: int, eps: float, norm_eps: float):
    """Hyper-connection mapping: (pre, post, comb) from the hc streams.

    streams: [T, hc, D]. comb is projected towards doubly stochastic by
    alternating column/row normalisation (Sinkhorn-Knopp), in fp32.
    """
    hc = streams.shape[1]
    flat = rmsnorm_unweighted(streams.flatten(start_dim=1).float(), norm_eps)
    pre_w, post_w, comb_w = row_linear(flat, fn.float()).split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = scale.unbind(0)
    pre = lane_sigmoid(pre_w * pre_s + pre_b) + eps
    post = 2 * lane_sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.view(-1, hc, hc) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
    low = faults.active("sinkhorn_bf16")
    if low:
        # FAULT sinkhorn_bf16: the softmax output is normalised in the activation dtype (a bf16 Sinkhorn
        # shared with other code) and cast back to fp32; every row and column sum rounds to bf16.
        comb = comb.to(streams.dtype)
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    if low:
        comb = comb.float()
    return pre, post, comb
