"""slot-invariance on a stock-PyTorch model (a transformers Llama, fp32):
a left-padded batch computes each sequence in another shape than the
sequence alone, so the bits may differ without any bug; a forgotten
attention mask lets the real tokens attend to the padding. The rounding rule
must tell the two apart on any CPU."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from parity import capture, slot_invariance
from parity.cli import cli
from parity.config import CaptureConfig

PROMPTS = [[5, 9, 3, 17, 22, 8, 41], [12, 30, 7, 2]]
CLASSES = frozenset({"LlamaDecoderLayer", "LlamaRMSNorm", "LlamaMLP"})


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _run(model, dump, prompts, mask: bool):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    att = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    h = capture.install(model, CaptureConfig(dump_dir=str(dump), classes=CLASSES))
    h.set_context(phase="prefill", step=0, seq_ids=list(range(len(prompts))), seq_lens=[len(p) for p in prompts],
                  padding_side="left")
    with torch.no_grad():
        model(ids, attention_mask=att if mask else None, position_ids=pos)
    h.set_run_info(token_ids=prompts, precision="fp32")
    h.close()
    return str(dump)


@pytest.fixture(scope="module")
def runs(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {
        "clean": _run(llama, root / "clean", PROMPTS, mask=True),
        "no_mask": _run(llama, root / "no_mask", PROMPTS, mask=False),
        "solos": [_run(llama, root / f"solo{i}", [p], mask=True) for i, p in enumerate(PROMPTS)],
    }


def test_a_clean_padded_batch_is_within_rounding(runs):
    res = slot_invariance(runs["clean"], runs["solos"])
    assert res.judge.mode == "rounding" and "fp32" in res.judge.rule
    assert res.status == "pass" and res.exit_code == 0, res.message
    floats = res.table[res.table["rel_l2"].notna()]
    assert len(floats) and (floats["rel_l2"] < 1e-5).all()


def test_a_forgotten_attention_mask_is_beyond_rounding(runs):
    res = slot_invariance(runs["no_mask"], runs["solos"])
    assert res.status == "fail" and res.exit_code == 1
    # Only the padded (shorter) sequence attends to padding, from the first layer on.
    assert set(res.first["slot"]) == {1}
    f = res.first.iloc[0]
    assert f["layer"] == 0 and "computes something else" in res.message
    assert (res.table[res.table["slot"] == 0]["verdict"] == "pass").all()


def test_the_cli_gives_the_two_runs_different_answers(runs):
    solos = sum([["--solo", s] for s in runs["solos"]], [])
    clean = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["clean"], *solos])
    broken = CliRunner().invoke(cli, ["slot-invariance", "--dir", runs["no_mask"], *solos])
    assert clean.exit_code == 0 and "result: pass" in clean.output, clean.output
    assert broken.exit_code == 1 and "beyond rounding" in broken.output, broken.output
