"""Taps on reference internals that are not module outputs.

    with reference_taps(model):
        model(input_ids)

records, through ``parity.tap`` (a no-op unless capture is on), under the
names of docs/CONTRACTS.md:

* ``model.layers.N.self_attn.indexer.topk``: the compressed entries each
  query of a CSA layer selects, ``[B, S, index_topk]`` int64, padded with -1
  where fewer entries exist (the engine's fixed width).
* ``model.layers.N.self_attn.compressed_kv``: the compressed KV entries this
  forward emitted (not the ones cached before), ``[B, n_new, head_dim]``;
  a forward that closes no window records nothing.
* ``model.layers.N.mlp.topk_ids`` / ``.topk_weights``: routed experts
  ``[B, S, top_k]`` and their final weights (normalised, scaled). The router
  returns them in no particular order (``topk(sorted=False)``), so both are
  put in ascending expert-id order; a consumer comparing them element-wise
  must do the same.
* ``model.layers.N.mlp.topk_margin``: score-routed layers only, ``[B, S]``
  float32: the k-th largest selection score (score + correction bias) minus
  the (k+1)-th, by which compare tells a near-tie flip from a changed choice.
* ``model.layers.N.attn_hc.mix`` / ``.ffn_hc.mix``: the hyper-connection
  weights ``[B, S, (2 + hc) * hc]`` = ``pre`` (hc) | ``post`` (hc) | ``comb``
  (hc x hc, row-major ``comb[j, k]``, the matrix applied as ``comb.T @ h``).
  The module returns ``post`` and ``comb``; ``pre`` is recomputed from the
  same inputs with the module's own parameters, exactly as its forward does.

The methods are wrapped on their classes for the duration of the block and
only instances inside ``model`` are recorded. A failing tap is swallowed:
instrumentation never changes what the reference computes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import parity
from parity.decisions import topk_margin
from parity.ref_patch import patch_method


def _classes():
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

    return m


def _arg(args, kwargs, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _safe(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - a tap must never break the reference
        pass


def pad_topk(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the last dim of top-k indices with -1 up to ``width``."""
    missing = width - indices.shape[-1]
    if missing <= 0:
        return indices
    return F.pad(indices, (0, missing), value=-1)


def hc_mix(module, hidden_streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``pre | post | comb`` of a hyper-connection, as documented above."""
    hc = module.hc_mult
    flat = module.input_norm(hidden_streams.flatten(start_dim=2).float())
    pre_w = F.linear(flat, module.fn.float())[..., :hc]
    pre = torch.sigmoid(pre_w * module.scale[0] + module.base[:hc]) + module.hc_eps
    return torch.cat([pre, post.to(pre.dtype), comb.flatten(-2).to(pre.dtype)], dim=-1)


@contextlib.contextmanager
def reference_taps(model):
    """Record indexer, compressor, router and hyper-connection internals."""
    m = _classes()
    paths = {id(mod): path for path, mod in model.named_modules()}

    def indexer(original, self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        path = paths.get(id(self))
        if path is not None:
            name = path.replace(".compressor.indexer", ".indexer") + ".topk"
            _safe(lambda: parity.tap(name, pad_topk(out, self.index_topk)))
        return out

    def compressor(original, self, *args, **kwargs):
        cache = _arg(args, kwargs, 3, "past_key_values")
        layer_idx = _arg(args, kwargs, 4, "layer_idx")
        before = 0
        if cache is not None:
            # The compressed entries come back with everything cached before;
            # the count tells which of them this forward added.
            before = cache.layers[layer_idx].entry_count["compressor"]
        out = original(self, *args, **kwargs)
        path = paths.get(id(self))
        if path is not None and out[0].shape[2] > before:
            name = path.removesuffix(".compressor") + ".compressed_kv"
            _safe(lambda: parity.tap(name, out[0][:, 0, before:]))
        return out

    def router(original, self, hidden_states, *args, **kwargs):
        out = original(self, hidden_states, *args, **kwargs)
        path = paths.get(id(self))
        if path is not None:
            def record():
                _, weights, ids = out
                lead = hidden_states.shape[:-1]
                ids, order = ids.sort(dim=-1)
                weights = weights.gather(-1, order)
                base = path.removesuffix(".gate")
                parity.tap(base + ".topk_ids", ids.long().reshape(*lead, -1))
                parity.tap(base + ".topk_weights", weights.reshape(*lead, -1))
                bias = getattr(self, "e_score_correction_bias", None)
                if bias is not None:  # a score-routed layer: the margin its choice was made by
                    chosen_by = self.score_fn(out[0]) + bias
                    parity.tap(base + ".topk_margin", topk_margin(chosen_by, self.top_k).reshape(lead))

            _safe(record)
        return out

    def hyper_connection(original, self, hidden_streams, *args, **kwargs):
        out = original(self, hidden_streams, *args, **kwargs)
        path = paths.get(id(self))
        if path is not None:
            post, comb, _ = out
            _safe(lambda: parity.tap(path + ".mix", hc_mix(self, hidden_streams, post, comb)))
        return out

    with contextlib.ExitStack() as stack:
        stack.enter_context(patch_method(m.DeepseekV4Indexer, "forward", indexer))
        stack.enter_context(patch_method(m.DeepseekV4CSACompressor, "forward", compressor))
        stack.enter_context(patch_method(m.DeepseekV4HCACompressor, "forward", compressor))
        stack.enter_context(patch_method(m.DeepseekV4TopKRouter, "forward", router))
        stack.enter_context(patch_method(m.DeepseekV4HashRouter, "forward", router))
        stack.enter_context(patch_method(m.DeepseekV4HyperConnection, "forward", hyper_connection))
        yield model
