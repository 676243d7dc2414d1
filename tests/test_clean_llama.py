"""The clean matrix beyond DeepSeek-V4: a transformers Llama, eager attention
(reference) against sdpa (target), same weights, fp32 and bf16. Both are
correct; no command may call them divergent. At bf16 the verdict comes from
a noise model of perturbed eager runs (parity.noise.perturbed works on any
torch model), as the calibrated rule for bf16 requires."""

from __future__ import annotations

import pytest
import torch

from parity import capture, compare_dumps, layer_bisect
from parity.config import CaptureConfig
from parity.noise import noise_model, perturbed

# eager attention also returns its weights (output.1); sdpa does not
KEEP = r"^(?!.*self_attn:output\.1$)"
CLASSES = frozenset({"LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm", "Linear"})


def _model(attn: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _dump(path, model, ids, precision, seed=None):
    h = capture.install(model, CaptureConfig(dump_dir=str(path), classes=CLASSES))
    h.set_context(phase="prefill", step=0, seq_ids=list(range(ids.shape[0])))
    with torch.no_grad():
        if seed is None:
            model(ids)
        else:
            with perturbed(model, seed):
                model(ids)
    h.set_run_info(token_ids=ids.tolist(), precision=precision)
    h.close()
    return str(path)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_eager_and_sdpa_agree(tmp_path, precision, dtype):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    eager, sdpa = _model("eager", dtype), _model("sdpa", dtype)
    ref = _dump(tmp_path / "ref", eager, ids, precision)
    target = _dump(tmp_path / "target", sdpa, ids, precision)
    noise = None
    if precision == "bf16":
        noise = noise_model(ref, [_dump(tmp_path / f"noise-{k}", eager, ids, precision, seed=k) for k in range(4)],
                            filter=KEEP)
    res = compare_dumps(ref, target, noise=noise, filter=KEEP)
    assert len(res.table) > 40 and not res.failed, res.table[res.table["verdict"] == "fail"]
    b = layer_bisect(None, None, compare=res)
    assert b.key is None and b.exit_code == 0, b.message


def test_records_shared_by_the_batch_are_compared_once(tmp_path):
    """A right-padded batch: transformers records rotary cos/sin as
    [1, S, D] for the whole batch. Shared, not a layout error."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    att = torch.ones_like(ids)
    att[1, 10:] = 0
    classes = CLASSES | {"LlamaRotaryEmbedding"}

    def dump(path, model):
        h = capture.install(model, CaptureConfig(dump_dir=str(path), classes=classes))
        h.set_context(phase="prefill", step=0, seq_ids=[0, 1], seq_lens=[16, 10])
        with torch.no_grad():
            model(ids, attention_mask=att, position_ids=torch.arange(16).unsqueeze(0))
        h.set_run_info(token_ids=[ids[0].tolist(), ids[1, :10].tolist()], precision="fp32")
        h.close()
        return str(path)

    ref = dump(tmp_path / "eager", _model("eager", torch.float32))
    res = compare_dumps(ref, dump(tmp_path / "sdpa", _model("sdpa", torch.float32)), filter=KEEP)
    rot = res.table[res.table["key"].str.startswith("model.rotary_emb")]
    assert len(rot) == 2 and rot["seq"].isna().all() and (rot["verdict"] == "pass").all(), rot
    assert not res.failed, res.table[res.table["verdict"] == "fail"]
