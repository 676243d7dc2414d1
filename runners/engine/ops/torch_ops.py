"""Reference (torch) implementations of the engine's hot ops.

These define what each op computes; other backends must agree with them.
Every op works on flat token rows ``[T, ...]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """
    T, H, D = q.shape
    out = q.new_empty(T, H, D)
    k_total = sum(idx.shape[1] for _, idx in sources)
    sink = sinks.float().view(1, H, 1)
    for s, e in _row_chunks(T, k_total * D):
        keys, masks = [], []
        for src, idx in sources:
            i = idx[s:e]
            keys.append(src[i.clamp(min=0)])
            masks.append(i < 0)
        kv = torch.cat(keys, dim=1)  # [t, K, D]
        invalid = torch.cat(masks, dim=1)
        logits = torch.bmm(q[s:e], kv.transpose(1, 2)) * scale  # [t, H, K], in the activation dtype
        logits = logits.masked_fill(invalid.unsqueeze(1), float("-inf"))
        # the fp32 sink promotes the softmax to fp32, as in the reference
        logits = torch.cat([logits.float(), sink.expand(e - s, H, 1)], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        out[s:e] = torch.bmm(probs.to(kv.dtype), kv)
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
    ar = torch.arange(E, device=q.device)
    for s, e in _row_chunks(T, E * q.shape[1]):
        kt = keys[token_seq[s:e]]  # [t, E, d]
        scores = torch.matmul(q[s:e].float(), kt.transpose(1, 2))  # [t, Hi, E]
        scores = F.relu(scores) * softmax_scale
        scores = (scores * weights[s:e].float().unsqueeze(-1)).sum(dim=1)  # [t, E]
        lim = limit[s:e].unsqueeze(-1)
        scores = scores.masked_fill(ar.view(1, -1) >= lim, float("-inf"))
        top = scores.topk(kk, dim=-1).indices
        out[s:e] = torch.where(top >= lim, torch.full_like(top, -1), top)
    return out


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight)


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
            y[start : start + n] = F.linear(swiglu(F.linear(seg, w13[e]), limit), w2[e])
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
    pre_w, post_w, comb_w = F.linear(flat, fn.float()).split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = scale.unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.view(-1, hc, hc) * comb_s + comb_b.view(hc, hc), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb
