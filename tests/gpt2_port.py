"""A GPT-2 written from scratch with its own module names, loaded from a
transformers GPT2LMHeadModel: the second model (not DeepSeek-V4) that the
compare commands are checked on. ``exact_gelu`` plants the classic porting
bug (erf gelu where GPT-2 uses the tanh approximation)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

MAPPING = Path(__file__).parent / "data" / "gpt2_port.yaml"


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):  # [B, S, D]
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, S, d]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
        att = att.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    def __init__(self, d: int, exact_gelu: bool):
        super().__init__()
        self.fc_in = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU(approximate="none" if exact_gelu else "tanh")
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc_out(self.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, eps: float, exact_gelu: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.ffn = FeedForward(d, exact_gelu)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class GPT2Port(nn.Module):
    def __init__(self, cfg, exact_gelu: bool = False):
        super().__init__()
        d = cfg.n_embd
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.n_positions, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.layer_norm_epsilon, exact_gelu)
                                    for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)

    def forward(self, ids):  # [B, S] -> logits [B, S, V]
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm_f(x))

    @classmethod
    def from_hf(cls, hf, exact_gelu: bool = False) -> "GPT2Port":
        """The port with ``hf``'s weights; GPT-2's Conv1D stores [in, out]."""
        port = cls(hf.config, exact_gelu)
        sd = hf.state_dict()
        names = {"tok.weight": "transformer.wte.weight", "pos.weight": "transformer.wpe.weight",
                 "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias",
                 "head.weight": "lm_head.weight"}
        conv = {"attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj", "ffn.fc_in": "mlp.c_fc",
                "ffn.fc_out": "mlp.c_proj"}
        for i in range(hf.config.n_layer):
            h = f"transformer.h.{i}"
            for mine, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                for p in ("weight", "bias"):
                    names[f"blocks.{i}.{mine}.{p}"] = f"{h}.{theirs}.{p}"
            for mine, theirs in conv.items():
                names[f"blocks.{i}.{mine}.weight"] = (f"{h}.{theirs}.weight", "t")
                names[f"blocks.{i}.{mine}.bias"] = f"{h}.{theirs}.bias"
        own = {}
        for k, v in names.items():
            src, how = v if isinstance(v, tuple) else (v, None)
            own[k] = sd[src].t().contiguous() if how == "t" else sd[src]
        port.load_state_dict(own)
        return port.eval()
