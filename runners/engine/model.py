"""DeepSeek-V4 as plain math over flat ragged token rows.

Activations are ``[T, hidden]`` (hyper-connection streams ``[T, hc, hidden]``)
for all sequences of a forward at once; everything sequence-shaped comes in
through ``ForwardMeta`` index tensors, built once per forward. Module names
follow transformers' ``DeepseekV4ForCausalLM`` so checkpoints and captures
line up.

Under tensor parallelism (``tp``, runners/engine/parallel.py) every rank
holds its share of the attention heads, the indexer heads, the o_proj
groups, the routed experts and the vocabulary; shapes below are per rank
(``H`` the rank's heads, ``E`` its experts). At TP=1 they are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runners.engine import faults, parallel
from runners.engine._tap import active as tap_active
from runners.engine._tap import tap
from runners.engine.cache import KVCache, LayerCache
from runners.engine.config import CSA, SLIDING, ModelConfig
from runners.engine.metadata import CompressMeta, ForwardMeta
from runners.engine.ops import invariant as inv
from runners.engine.ops import ops
from runners.engine.ops import quant
from runners.engine.ops.torch_ops import swiglu
from runners.engine.parallel import SINGLE, TP


@dataclass
class Ctx:
    """What one forward's layers share: metadata, cache, RoPE tables."""

    meta: ForwardMeta
    cache: KVCache
    rope: dict  # "main"/"compress" -> (cos, sin) at the token positions
    entry_rope: dict  # layer type -> (cos, sin) at the emitted entries' positions


def _empty(*shape):
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T. A quantized checkpoint adds a block scale (``weight_scale_inv``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty(out_features, in_features)
        self.register_buffer("weight_scale_inv", None)

    def forward(self, x):
        if self.weight_scale_inv is None:
            return ops.linear(x, self.weight)
        return ops.fp8_linear(x, self.weight, self.weight_scale_inv)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = _empty(dim)
        self.eps = eps

    def forward(self, x):
        return ops.rmsnorm(x, self.weight, self.eps)


class GroupedLinear(nn.Module):
    """Block-diagonal projection: group g of the input goes through its own slice of weight."""

    def __init__(self, in_per_group: int, out_features: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = _empty(out_features, in_per_group)
        self.register_buffer("weight_scale_inv", None)

    def forward(self, x):  # x: [T, G, in_per_group] -> [T, G, out/G]
        n = self.weight.shape[0] // self.groups
        if self.weight_scale_inv is None:
            owner, decode, tag = self.weight, lambda: self.weight.to(x.dtype), x.dtype
        else:
            if faults.active("fp8_unscaled_o_a"):
                # FAULT fp8_unscaled_o_a: this projection is dequantized by hand for its grouped matmul
                # (not through fp8_linear), and the hand-written cast forgets the 128x128 block scales.
                owner, decode, tag = self.weight, lambda: self.weight.to(x.dtype), ("unscaled", x.dtype)
            else:
                owner, decode, tag = self.weight, lambda: quant.fp8_weight(self.weight, self.weight_scale_inv,
                                                                           x.dtype), ("fp8", x.dtype)
            x = quant.qdq_act(x)
        return torch.stack([inv.linear_decoded(x[:, g], owner, decode, rows=slice(g * n, (g + 1) * n), tag=tag)
                            for g in range(self.groups)], dim=1)


class WindowCompressor(nn.Module):
    """Gated pooling of every `ratio` tokens into one entry (HCA), or, with
    `overlap`, of the current block's second half-channels plus the previous
    block's first half-channels (CSA and its indexer)."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, overlap: bool):
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = Linear(cfg.hidden_size, width)
        self.gate_proj = Linear(cfg.hidden_size, width)
        self.position_bias = _empty(ratio, width)
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps)

    def compress(self, x, cm: CompressMeta, ring_kv, ring_gate, pool, cos, sin):
        """Emit this forward's closed windows into `pool`; returns them [Nw, head_dim]."""
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        width, r, hd = kv.shape[-1], self.ratio, self.head_dim
        emitted = kv.new_zeros(0, hd)
        if cm.src_idx.shape[0]:
            idx = cm.src_idx
            rows = idx.clamp(min=0)
            kv_rows = torch.cat([ring_kv.view(-1, width), kv])[rows]
            gate_rows = torch.cat([ring_gate.view(-1, width), gate])[rows]
            gate_rows = gate_rows + self.position_bias.repeat(idx.shape[1] // r, 1)
            if self.overlap:  # previous block's first half, this block's second half
                kv_rows = torch.cat([kv_rows[:, :r, :hd], kv_rows[:, r:, hd:]], dim=1)
                gate_rows = torch.cat([gate_rows[:, :r, :hd], gate_rows[:, r:, hd:]], dim=1)
            missing = (idx < 0).unsqueeze(-1)  # before the sequence start
            kv_rows = kv_rows.masked_fill(missing, 0.0)
            gate_rows = gate_rows.masked_fill(missing, float("-inf"))
            emitted = self.kv_norm(ops.compressor_pool(kv_rows, gate_rows))
            emitted = ops.rope(emitted, cos, sin)
            pool[cm.pool_dst] = emitted.to(pool.dtype)
        ring_kv.view(-1, width)[cm.ring_dst] = kv[cm.ring_src].to(ring_kv.dtype)
        ring_gate.view(-1, width)[cm.ring_dst] = gate[cm.ring_src].to(ring_gate.dtype)
        return emitted


class IndexerScorer(nn.Module):
    def __init__(self, cfg: ModelConfig, n_heads: int):
        super().__init__()
        self.weights_proj = Linear(cfg.hidden_size, n_heads)


class Indexer(WindowCompressor):
    """Lightning indexer: its own compressed keys, then top-k entries per query."""

    def __init__(self, cfg: ModelConfig, ratio: int, layer_idx: int, tp: TP = SINGLE):
        super().__init__(cfg, ratio, cfg.index_head_dim, overlap=True)
        self.layer_idx, self.tp = layer_idx, tp
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.n_local = cfg.index_n_heads // tp.size
        self.q_b_proj = Linear(cfg.q_lora_rank, self.n_local * cfg.index_head_dim)
        self.scorer = IndexerScorer(cfg, self.n_local)
        if tp.size > 1:
            heads = tp.part(cfg.index_n_heads, "indexer heads")
            _column(self.q_b_proj, _head_rows(range(heads.start, heads.stop), self.head_dim))
            _column(self.scorer.weights_proj, heads)

    def forward(self, x, q_res, ctx: Ctx, cm: CompressMeta, lc: LayerCache):
        cos, sin = ctx.entry_rope[CSA]
        self.compress(x, cm, lc.idx_kv, lc.idx_gate, lc.idx_pool, cos, sin)
        cos, sin = ctx.rope["compress"]
        q = self.q_b_proj(q_res).view(x.shape[0], self.n_local, self.head_dim)  # [T, Hi, d]
        q = ops.rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
        w = self.scorer.weights_proj(x).float() * self.n_heads**-0.5  # [T, Hi]
        # The top-k needs every head's score: the heads are gathered and the
        # scoring runs whole on every rank (the op scores and selects in one).
        q, w = parallel.all_gather(q, self.tp, 1), parallel.all_gather(w, self.tp, 1)
        m = ctx.meta
        limit = cm.limit
        if faults.active("indexer_frontier_off_by_one"):
            # FAULT indexer_frontier_off_by_one: p // ratio + 1 instead of (p + 1) // ratio, so a query
            # also sees the entry of its own block before that block is complete.
            limit = m.positions // self.ratio + 1
        top = ops.indexer_topk(q, w, lc.idx_pool, cm.entry_idx, m.token_seq, limit, self.topk,
                               self.head_dim**-0.5)
        tap(f"model.layers.{self.layer_idx}.self_attn.indexer.topk", top, cu_seqlens=m.cu_seqlens)
        return top


class Compressor(WindowCompressor):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TP = SINGLE):
        lt = cfg.layer_types[layer_idx]
        super().__init__(cfg, cfg.ratio(layer_idx), cfg.head_dim, overlap=lt == CSA)
        self.layer_idx, self.layer_type = layer_idx, lt
        self.indexer = Indexer(cfg, self.ratio, layer_idx, tp) if lt == CSA else None

    def forward(self, x, q_res, ctx: Ctx):
        """Emits this forward's entries into the pool; returns them and, per
        query, the pool rows it attends to (-1 for none)."""
        cm = ctx.meta.compress[self.layer_type]
        lc = ctx.cache.layers[self.layer_idx]
        cos, sin = ctx.entry_rope[self.layer_type]
        emitted = self.compress(x, cm, lc.cmp_kv, lc.cmp_gate, lc.cmp_pool, cos, sin)
        # rows are compressed entries, not tokens: a prompt in chunks emits them chunk by chunk
        tap(f"model.layers.{self.layer_idx}.self_attn.compressed_kv", emitted, cu_seqlens=cm.emitted_cu,
            rows="entries")
        if self.indexer is None:
            return emitted, cm.attn_idx
        top = self.indexer(x, q_res, ctx, cm, lc)
        rows = cm.entry_idx[ctx.meta.token_seq].gather(1, top.clamp(min=0))
        return emitted, torch.where(top >= 0, rows, torch.full_like(rows, -1))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TP = SINGLE):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.n_heads, self.head_dim, self.groups = cfg.num_heads // tp.size, cfg.head_dim, cfg.o_groups // tp.size
        self.eps = cfg.rms_norm_eps
        self.rope_label = "main" if cfg.layer_types[layer_idx] == SLIDING else "compress"
        self.scaling = cfg.head_dim**-0.5
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * cfg.head_dim)
        self.kv_proj = Linear(cfg.hidden_size, cfg.head_dim)  # one KV head: replicated
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(cfg.num_heads * cfg.head_dim // cfg.o_groups,
                                      self.groups * cfg.o_lora_rank, self.groups)
        self.o_b_proj = Linear(self.groups * cfg.o_lora_rank, cfg.hidden_size)
        self.sinks = _empty(self.n_heads)
        self.compressor = Compressor(cfg, layer_idx, tp) if cfg.layer_types[layer_idx] != SLIDING else None
        if tp.size > 1:
            self._split(cfg, tp)

    def _split(self, cfg: ModelConfig, tp: TP):
        """Heads split over ranks: q_b_proj column-parallel, the sinks with
        their heads, o_a_proj by whole groups (a group reads only its own
        heads, so a rank's groups are exactly its heads' when the ranks
        divide the groups), o_b_proj row-parallel."""
        heads = tp.part(cfg.num_heads, "attention heads")
        groups = tp.part(cfg.o_groups, "o_proj groups")
        q_heads = range(heads.start, heads.stop)
        if faults.active("tp_heads_strided"):
            # FAULT tp_heads_strided: q_b_proj's heads dealt to ranks round-robin (head h on rank h % tp)
            # while the sinks and o_a_proj's groups take contiguous heads.
            q_heads = range(tp.rank, cfg.num_heads, tp.size)
        _column(self.q_b_proj, _head_rows(q_heads, self.head_dim))
        sinks = heads
        if faults.active("tp_sinks_offset"):
            # FAULT tp_sinks_offset: the sinks' slice forgets the rank offset: every rank loads rank 0's.
            sinks = slice(0, heads.stop - heads.start)
        parallel.shard(self, "sinks", 0, sinks)
        o = cfg.o_lora_rank
        _column(self.o_a_proj, slice(groups.start * o, groups.stop * o), out_dim=-2)  # output [T, G, o]
        _row(self.o_b_proj, slice(groups.start * o, groups.stop * o))

    def forward(self, x, ctx: Ctx):
        T, H, D = x.shape[0], self.n_heads, self.head_dim
        m, lc = ctx.meta, ctx.cache.layers[self.layer_idx]
        cos, sin = ctx.rope[self.rope_label]
        cos_h, sin_h = cos.unsqueeze(1), sin.unsqueeze(1)

        q_res = self.q_a_norm(self.q_a_proj(x))
        q = ops.rmsnorm_unweighted(self.q_b_proj(q_res).view(T, H, D), self.eps)
        q = ops.rope(q, cos_h, sin_h)
        kv = ops.rope(self.kv_norm(self.kv_proj(x)), cos, sin)  # one head, read as K and V

        win = lc.win.view(-1, D)
        sources = [(torch.cat([win, kv.to(win.dtype)]), m.win_idx)]
        if self.compressor is not None:
            _, rows = self.compressor(x, q_res, ctx)
            sources.append((lc.cmp_pool, rows))
        out = ops.sparse_attention(q, sources, self.sinks, self.scaling)
        win[m.win_dst] = kv[m.win_src].to(win.dtype)

        # K=V carried RoPE into the values: rotate back at the query position.
        if not faults.active("skip_inverse_rope"):  # FAULT skip_inverse_rope: the output keeps the keys' RoPE
            out = ops.rope(out, cos_h, -sin_h)
        out = self.o_a_proj(out.reshape(T, self.groups, -1)).flatten(1)
        out = self.o_b_proj(out)  # [T, hidden]; under TP this rank's partial sum
        if not faults.active("tp_missing_all_reduce"):
            # FAULT tp_missing_all_reduce: the row-parallel o_b_proj's partial sums are not all-reduced.
            out = parallel.all_reduce(out, self.tp)
        return out, None  # (output, attention weights) like the reference; no weights kept


class HyperConnection(nn.Module):
    """Mixes hc residual streams: collapse weights `pre`, placement `post`, Sinkhorn `comb`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = hc, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = _empty((2 + hc) * hc, hc * cfg.hidden_size)
        self.base = _empty((2 + hc) * hc)
        self.scale = _empty(3)
        self.name = ""

    def forward(self, streams):
        iters = self.iters
        if faults.active("sinkhorn_off_by_one"):
            # FAULT sinkhorn_off_by_one: hc_sinkhorn_iters read as the number of row+column rounds after
            # the first column normalisation; the reference runs hc_sinkhorn_iters - 1 of them.
            iters += 1
        pre, post, comb = ops.hc_sinkhorn(streams, self.fn, self.base, self.scale, iters, self.eps,
                                          self.norm_eps)
        tap(f"{self.name}.mix", torch.cat([pre, post, comb.flatten(1)], dim=-1))  # pre | post | comb
        collapsed = inv.sum(pre.unsqueeze(-1) * streams, dim=1).to(streams.dtype)
        return post, comb, collapsed


class HyperHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hc = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = _empty(hc, hc * cfg.hidden_size)
        self.hc_base = _empty(hc)
        self.hc_scale = _empty(1)

    def forward(self, x):
        flat = ops.rmsnorm_unweighted(x.flatten(1).float(), self.norm_eps)
        mixes = inv.linear(flat, self.hc_fn.float())
        pre = inv.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return inv.sum(pre.unsqueeze(-1) * x, dim=1).to(x.dtype)


class SharedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.limit = cfg.swiglu_limit
        self.gate_proj = Linear(cfg.hidden_size, inter)
        self.up_proj = Linear(cfg.hidden_size, inter)
        self.down_proj = Linear(inter, cfg.hidden_size)

    def forward(self, x):
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(inv.silu(gate) * up)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, is_hash: bool):
        super().__init__()
        self.is_hash, self.top_k, self.scoring = is_hash, cfg.top_k, cfg.scoring_func
        self.scaling = cfg.routed_scaling_factor
        self.weight = _empty(cfg.n_routed_experts, cfg.hidden_size)
        if is_hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.top_k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def _scores(self, logits):
        if self.scoring == "sqrtsoftplus":
            return inv.softplus(logits).sqrt()
        if self.scoring == "sigmoid":
            return inv.sigmoid(logits)
        return inv.softmax(logits, dim=-1)

    def margin(self, logits):
        """Score-routed layers: the k-th largest selection score minus the
        (k+1)-th per token, the margin the choice was made by; None for hash
        routing, whose choice is no score's."""
        if self.is_hash:
            return None
        top = (self._scores(logits) + self.e_score_correction_bias).float().topk(self.top_k + 1, dim=-1).values
        return top[:, -2] - top[:, -1]

    def forward(self, x, input_ids):
        logits = inv.linear(x, self.weight)
        scores = self._scores(logits)
        if self.is_hash:  # which experts is a fixed function of the token id
            ids = self.tid2eid[input_ids].long()
        else:  # the correction bias picks experts but never weighs them
            ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        if self.is_hash and faults.active("hash_routed_by_score"):
            # FAULT hash_routed_by_score: a router written for score layers only; tid2eid is loaded but unused.
            ids = torch.topk(scores, self.top_k, dim=-1, sorted=False).indices
        w = scores.gather(1, ids)
        w = w / (inv.sum(w, dim=-1, keepdim=True) + 1e-20)
        if not self.is_hash and faults.active("skip_routed_scale"):
            # FAULT skip_routed_scale: the score-routed path returns the normalised weights unscaled.
            return logits, w, ids
        return logits, w * self.scaling, ids


class Experts(nn.Module):
    """The routed experts; under TP expert-parallel: each rank holds whole
    experts ``first .. first+E-1`` and returns its partial sum."""

    def __init__(self, cfg: ModelConfig, tp: TP = SINGLE):
        super().__init__()
        E, I, D = cfg.n_routed_experts // tp.size, cfg.moe_intermediate_size, cfg.hidden_size
        self.limit, self.tp = cfg.swiglu_limit, tp
        self.hidden, self.inter = D, I
        self.gate_up_proj = _empty(E, 2 * I, D)
        self.down_proj = _empty(E, D, I)
        self.register_buffer("gate_up_proj_scale_inv", None)  # set when the experts are FP4
        self.register_buffer("down_proj_scale_inv", None)
        self.first = 0
        if tp.size > 1:
            mine = tp.part(cfg.n_routed_experts, "routed experts")
            self.first = mine.start
            if faults.active("tp_expert_offset") and tp.rank == 1:
                # FAULT tp_expert_offset: rank 1's expert shard is loaded one expert early (experts 7..14 for
                # 8..15 at tp=2) while routing still sends it experts 8..15.
                mine = slice(mine.start - 1, mine.stop - 1)
            parallel.shard(self, "gate_up_proj", 0, mine)
            parallel.shard(self, "down_proj", 0, mine)
            parallel.declare(self, "output", shard_reduce="sum")

    def _fp4_expert(self, e, rows):
        return quant.fp4_expert(rows, e, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj,
                                self.down_proj_scale_inv, self.limit, self.hidden, self.inter)

    def _dense_expert(self, e, rows):
        return inv.linear(swiglu(inv.linear(rows, self.gate_up_proj, index=e), self.limit), self.down_proj, index=e)

    def forward(self, x, ids, weights):
        fn = self._fp4_expert if self.gate_up_proj_scale_inv is not None else None
        if self.tp.size > 1:
            ids, weights, fn = self._local(ids, weights, fn or self._dense_expert)
        return ops.fused_moe(x, ids, weights, self.gate_up_proj, self.down_proj, self.limit, fn)

    def _local(self, ids, weights, expert):
        """Ids and weights of this rank's experts; a pair routed to another
        rank goes to a null expert (local id E) of output 0 and weight 0. A
        token's partial sums then add up, over the ranks, to its whole sum;
        for top-2 bitwise, since either sum is one addition."""
        n = self.gate_up_proj.shape[0]
        local = ids - self.first
        mine = (local >= 0) & (local < n)
        ids = torch.where(mine, local, torch.full_like(local, n))  # [T, k]
        weights = torch.where(mine, weights, torch.zeros_like(weights))

        def run(e, rows):
            return rows.new_zeros(rows.shape[0], self.hidden) if e == n else expert(e, rows)

        return ids, weights, run


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TP = SINGLE):
        super().__init__()
        self.layer_idx, self.tp = layer_idx, tp
        self.gate = Router(cfg, cfg.mlp_layer_types[layer_idx] == "hash_moe")  # replicated
        self.experts = Experts(cfg, tp)
        # Replicated: added after the all-reduce, so the routed sum stays exact.
        self.shared_experts = SharedMLP(cfg)

    def forward(self, x, ctx: Ctx):
        logits, w, ids = self.gate(x, ctx.meta.input_ids)
        cu = ctx.meta.cu_seqlens
        # Tapped in ascending expert order, as the contract (and the reference) has them.
        by_id = ids.argsort(dim=-1)
        tap(f"model.layers.{self.layer_idx}.mlp.topk_ids", ids.gather(-1, by_id), cu_seqlens=cu)
        tap(f"model.layers.{self.layer_idx}.mlp.topk_weights", w.gather(-1, by_id), cu_seqlens=cu)
        if tap_active() and not self.gate.is_hash:  # computed for capture only
            tap(f"model.layers.{self.layer_idx}.mlp.topk_margin", self.gate.margin(logits), cu_seqlens=cu)
        routed = self.experts(x, ids, w)  # [T, D]; under TP this rank's experts only
        shared = self.shared_experts(x)
        if faults.active("tp_shared_expert_every_rank"):
            # FAULT tp_shared_expert_every_rank: the replicated shared expert joins every rank's partial sum
            # before the all-reduce (a bias added on every rank), so it counts tp times.
            return parallel.all_reduce(routed + shared, self.tp)
        return parallel.all_reduce(routed, self.tp) + shared


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TP = SINGLE):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.mlp = MoE(cfg, layer_idx, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(cfg)
        self.ffn_hc = HyperConnection(cfg)
        self.attn_hc.name = f"model.layers.{layer_idx}.attn_hc"
        self.ffn_hc.name = f"model.layers.{layer_idx}.ffn_hc"

    def forward(self, streams, ctx: Ctx):
        dtype = streams.dtype
        post, comb, collapsed = self.attn_hc(streams)
        out, _ = self.self_attn(self.input_layernorm(collapsed), ctx)
        streams = post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + _mix_streams(comb.to(dtype), streams)
        post, comb, collapsed = self.ffn_hc(streams)
        out = self.mlp(self.post_attention_layernorm(collapsed), ctx)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + _mix_streams(comb.to(dtype), streams)


def _mix_streams(comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """new_k = sum_j comb[j, k] * stream_j, for comb [T, hc, hc], streams [T, hc, D].

    Written as a broadcast product and a sum over j rather than a batched
    matmul: the matmul's kernel (and rounding) changes with T, which made a
    sequence's streams depend on the batch it ran in."""
    # fp32 products and sum, one rounding at the end: what a bf16 matmul does.
    return inv.sum(comb.float().unsqueeze(-1) * streams.float().unsqueeze(-2), dim=1).to(streams.dtype)


class DeepseekV4Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TP = SINGLE):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # replicated
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)
        self.register_buffer("main_inv_freq", cfg.rope_main.inv_freq(), persistent=False)
        self.register_buffer("compress_inv_freq", cfg.rope_compress.inv_freq(), persistent=False)

    def _cos_sin(self, label: str, positions, dtype):
        inv_freq = self.main_inv_freq if label == "main" else self.compress_inv_freq
        scale = (self.cfg.rope_main if label == "main" else self.cfg.rope_compress).attention_factor
        cos, sin = inv.cos_sin(positions.float().unsqueeze(-1) * inv_freq.float().unsqueeze(0))
        return (cos * scale).to(dtype), (sin * scale).to(dtype)

    def forward(self, meta: ForwardMeta, cache: KVCache):
        x = self.embed_tokens(meta.input_ids)
        dt = x.dtype
        ctx = Ctx(
            meta=meta, cache=cache,
            rope={lbl: self._cos_sin(lbl, meta.positions, dt) for lbl in ("main", "compress")},
            entry_rope={lt: self._cos_sin("compress", cm.win_pos, dt) for lt, cm in meta.compress.items()},
        )
        streams = x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(streams, ctx)
        return self.norm(self.hc_head(streams))


class DeepseekV4ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TP = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.model = DeepseekV4Model(cfg, tp)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size // tp.size)
        if tp.size > 1:
            _column(self.lm_head, tp.part(cfg.vocab_size, "vocabulary"))

    @torch.inference_mode()
    def forward(self, meta: ForwardMeta, cache: KVCache, all_logits: bool = False):
        """Logits of each sequence's last row ([B, V]), or of every row ([T, V])."""
        h = self.model(meta, cache)
        if not all_logits:
            h = h[meta.last_rows]
        # every rank gets the whole vocabulary, so each samples the same token
        return parallel.all_gather(self.lm_head(h), self.tp, -1).float()


def _head_rows(heads, head_dim: int) -> torch.Tensor:
    """Output rows of a head-major [heads * head_dim, ...] weight that ``heads`` own."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long, device="cpu")


def _column(linear: nn.Module, rows, out_dim: int = -1) -> None:
    """Column-parallel: this rank's output features ``rows``; its output is a shard along ``out_dim``."""
    parallel.shard(linear, "weight", 0, rows)
    parallel.declare(linear, "output", shard_dim=out_dim)


def _row(linear: nn.Module, cols) -> None:
    """Row-parallel: this rank's input features ``cols``; its output a partial sum."""
    parallel.shard(linear, "weight", 1, cols)
    parallel.declare(linear, "output", shard_reduce="sum")
