"""Synthetic dumps for the compare tests, written through DumpWriter.

A toy decoder (embedding, L layers of norm / causal-mean "attention" / norm /
top-k routed "MoE", final norm, lm_head) runs on the CPU at a chosen
precision. The reference writes one sequence per forward as ``[1, S, ...]``;
the engine writes every sequence in one ragged ``[T, ...]`` forward with
``cu_seqlens``, optionally split over tensor-parallel ranks. Errors are
injected through ``perturb(layer, stage, seq_id, tensor) -> tensor`` and flow
downstream like real bugs do.
"""

from __future__ import annotations

import math

import torch

from parity.store import DumpWriter, Record
from parity.store.stats import tensor_stats

# Stage names inside a layer, in execution order (module suffix, stage).
LAYER_STAGES = [("input_layernorm", "output"), ("self_attn", "output"),
                ("post_attention_layernorm", "output"), ("mlp.topk_ids", "tap"),
                ("mlp.topk_weights", "tap"), ("mlp", "output"), ("", "output")]

# mode -> (dtype every op computes in, dtype every stage output is rounded to).
# "bf16" rounds after each op (an unfused engine); "bf16-fused" computes a
# stage in fp32 and rounds its output once (a reference run in bf16).
_MODES = {"fp64": (torch.float64, torch.float64), "fp32": (torch.float32, torch.float32),
          "bf16": (torch.bfloat16, torch.bfloat16), "bf16-fused": (torch.float32, torch.bfloat16)}


class Toy:
    def __init__(self, hidden=64, layers=4, vocab=97, experts=8, top_k=2, seed=3):
        # seed 3: no routing near-tie flips under bf16 noise on the test prompts; seed 0 has some.
        g = torch.Generator().manual_seed(seed)
        r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale
        self.hidden, self.layers, self.vocab, self.top_k = hidden, layers, vocab, top_k
        self.embed = r(vocab, hidden)
        self.wq = [r(hidden, hidden, scale=1 / math.sqrt(hidden)) for _ in range(layers)]
        self.wr = [r(hidden, experts, scale=1 / math.sqrt(hidden)) for _ in range(layers)]
        self.we = [r(experts, hidden, hidden, scale=1 / math.sqrt(hidden)) for _ in range(layers)]
        self.head = r(hidden, vocab, scale=1 / math.sqrt(hidden))

    def forward(self, tokens, mode="fp32", perturb=None, seq_id=0):
        """[(module, stage, layer, tensor [S, ...])] in execution order, computed
        at ``mode`` precision (every op's inputs and output rounded to it)."""
        dt, rt = _MODES[mode]
        c = lambda t: t.to(dt)
        out = []

        def emit(module, stage, layer, t):
            if t.is_floating_point():
                t = t.to(rt).to(dt)
            if perturb is not None:
                new = perturb(layer, f"{module}:{stage}", seq_id, t)
                if new.shape != t.shape:
                    # A dump-side shape bug: recorded, while the model runs on.
                    out.append((module, stage, layer, new))
                    return t
                t = new
            out.append((module, stage, layer, t))
            return t

        def rms(x):
            return c(x / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6).to(dt))

        h = emit("model.embed_tokens", "output", None, c(self.embed[torch.tensor(tokens)]))
        n = torch.arange(1, len(tokens) + 1, dtype=dt)[:, None]
        for L in range(self.layers):
            p = f"model.layers.{L}"
            x = emit(f"{p}.input_layernorm", "output", L, rms(h))
            attn = c(torch.tanh(c(torch.cumsum(c(x @ c(self.wq[L])), 0) / n)))
            attn = emit(f"{p}.self_attn", "output", L, attn)
            x2 = emit(f"{p}.post_attention_layernorm", "output", L, rms(c(h + attn)))
            logits = (x2 @ c(self.wr[L])).double()
            w, ids = torch.topk(torch.softmax(logits, -1), self.top_k, -1)
            ids = emit(f"{p}.mlp.topk_ids", "tap", L, ids)
            w = emit(f"{p}.mlp.topk_weights", "tap", L, c(w / w.sum(-1, keepdim=True)))
            mlp = torch.zeros_like(x2)
            for k in range(self.top_k):
                mlp = c(mlp + w[:, k:k + 1] * c(torch.tanh(c(torch.einsum("sh,shk->sk", x2, c(self.we[L][ids[:, k]]))))))
            mlp = emit(f"{p}.mlp", "output", L, mlp)
            h = emit(p, "output", L, c(c(h + attn) + mlp))
        h = emit("model.norm", "output", None, rms(h))
        emit("lm_head", "output", None, c(h @ c(self.head)))
        return out

    def steps(self, tokens, decode_steps=0, continuation=None, **kw):
        """[(phase, step, [(module, stage, layer, tensor)])]: prefill over the
        prompt, then one row per decode step (full recompute, last row kept)."""
        res = [("prefill", 0, self.forward(tokens, **kw))]
        cont = list(continuation or [(t * 7 + 3) % self.vocab for t in range(decode_steps)])
        for k in range(1, decode_steps + 1):
            full = self.forward(list(tokens) + cont[:k], **kw)
            res.append(("decode", k, [(m, s, l, t[-1:]) for m, s, l, t in full]))
        return res


def _record(w, module, stage, layer, phase, step, meta, t, rank=0, world=1):
    t = t.contiguous()
    rec = Record(key=f"{module}:{stage}", module=module, stage=stage, cls="tap" if stage == "tap" else "M",
                 layer=layer, call=0, phase=phase, step=step, rank=rank, world_size=world,
                 shape=list(t.shape), meta=dict(meta), seq=w.next_seq(), stats=tensor_stats(t))
    return rec, t


def _store(t, store):
    return t if not t.is_floating_point() else t.to(store)


def write_reference(root, toy, prompts, *, mode="fp32", store=torch.bfloat16, decode_steps=0,
                    perturb=None, seq_ids=None, batched=False):
    """One forward per sequence (``[1, S, ...]``, seq_ids ``[i]``), or all of
    them in one padded-free ``[B, S, ...]`` forward when ``batched``."""
    seq_ids = list(seq_ids if seq_ids is not None else range(len(prompts)))
    w = DumpWriter(str(root), run_info={"impl": "reference", "precision": mode, "token_ids": [list(p) for p in prompts]},
                   fsync=False)
    runs = [toy.steps(p, decode_steps, mode=mode, perturb=perturb, seq_id=s) for p, s in zip(prompts, seq_ids)]
    groups = [list(range(len(prompts)))] if batched else [[i] for i in range(len(prompts))]
    for grp in groups:
        for si in range(len(runs[0])):
            phase, step, _ = runs[grp[0]][si]
            items = []
            for j, (m, s, l, _) in enumerate(runs[grp[0]][si][2]):
                t = torch.stack([runs[i][si][2][j][3] for i in grp])
                items.append(_record(w, m, s, l, phase, step, {"seq_ids": [seq_ids[i] for i in grp]},
                                     _store(t, store)))
            w.write_batch(items)
    w.close()
    return w.root


def write_engine(root, toy, prompts, *, mode="bf16", store=torch.bfloat16, decode_steps=0, perturb=None,
                 seq_ids=None, tp=1, shard=("self_attn:output", "mlp:output"), drop_ranks=(), rename=None,
                 order=None):
    """All sequences in one ragged forward per step. With ``tp`` > 1 every rank
    writes the records whose key ends with one of ``shard`` split along the
    hidden dim (``meta.shard_dim``); the rest are replicated on every rank.
    ``rename(module) -> module`` gives the engine its own names; ``order``
    lists prompt indices in the order the batch holds them."""
    seq_ids = list(seq_ids if seq_ids is not None else range(len(prompts)))
    if order is not None:
        prompts, seq_ids = [prompts[i] for i in order], [seq_ids[i] for i in order]
    runs = [toy.steps(p, decode_steps, mode=mode, perturb=perturb, seq_id=s) for p, s in zip(prompts, seq_ids)]
    roots = None
    for rank in range(tp):
        if rank in drop_ranks:
            continue
        w = DumpWriter(str(root), rank, tp, if_exists="error" if rank == 0 else "overwrite",
                       run_info={"impl": "engine", "precision": mode,
                                 "token_ids": [list(p) for _, p in sorted(zip(seq_ids, prompts))]}, fsync=False)
        roots = roots or w.root
        for si in range(len(runs[0])):
            phase, step, recs = runs[0][si]
            items = []
            for j, (m, s, l, _) in enumerate(recs):
                parts = [runs[i][si][2][j][3] for i in range(len(prompts))]
                cu = [0]
                for p in parts:
                    cu.append(cu[-1] + p.shape[0])
                t = _store(torch.cat(parts), store)
                meta = {"seq_ids": seq_ids, "cu_seqlens": cu}
                key = f"{m}:{s}"
                if tp > 1 and any(key.endswith(x) for x in shard):
                    t = t.chunk(tp, dim=-1)[rank]
                    meta["shard_dim"] = t.dim() - 1
                items.append(_record(w, rename(m) if rename else m, s, l, phase, step, meta, t, rank, tp))
            w.write_batch(items)
        w.close()
    return roots


def scale_at(layer, key_suffix, factor, seqs=None):
    """A perturbation multiplying one stage's output by ``factor``."""
    def f(L, key, seq, t):
        if L == layer and key.endswith(key_suffix) and (seqs is None or seq in seqs) and t.is_floating_point():
            return (t.double() * factor).to(t.dtype)
        return t
    return f


def noise_at(layer, key_suffix, rel, seqs=None, seed=1):
    """Add Gaussian noise of relative L2 size ``rel`` to one stage's output."""
    def f(L, key, seq, t):
        if L == layer and key.endswith(key_suffix) and (seqs is None or seq in seqs) and t.is_floating_point():
            g = torch.Generator().manual_seed(seed + (seq or 0))
            n = torch.randn(t.shape, generator=g, dtype=torch.float64)
            x = t.double()
            return (x + n * (rel * x.norm() / n.norm())).to(t.dtype)
        return t
    return f


def one_ulp(t):
    """``t`` with its first element moved by one unit in the last place."""
    t = t.clone()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    t.reshape(-1).view(bits)[0] += 1
    return t
