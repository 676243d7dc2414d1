"""Presets, tokenizer, checkpoint synthesis and offline loading of the reference."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parity.errors import ParityError
from reference_models.load import CheckpointError, load_reference, load_tokenizer
from reference_models.presets import PRESETS, get_config, preset_kwargs
from reference_models.synth import CheckpointExistsError, synthesize


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_reference(tiny_ckpt, "fp32")


def test_presets_build_and_tiny_covers_every_path():
    for name in PRESETS:
        get_config(name)
    cfg = get_config("tiny")
    assert set(cfg.layer_types) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert set(cfg.mlp_layer_types) == {"hash_moe", "moe"}
    assert cfg.compress_rates == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}
    assert cfg.sliding_window == 16 and cfg.hc_mult == 4 and cfg.vocab_size == 4096
    assert cfg.n_routed_experts == 16 and cfg.num_experts_per_tok == 2
    assert cfg.index_topk < 256 // 4  # a 256-token prompt has more entries than top-k keeps
    flash = get_config("flash-shape")
    assert (flash.hidden_size, flash.num_attention_heads, flash.head_dim) == (4096, 64, 512)
    assert (flash.n_routed_experts, flash.num_experts_per_tok, flash.index_topk) == (256, 6, 512)


def test_preset_overrides_and_errors():
    cfg = get_config("tiny", num_hidden_layers=8)
    assert len(cfg.layer_types) == 8 and len(cfg.mlp_layer_types) == 8
    assert preset_kwargs("tiny", hidden_size=128)["hidden_size"] == 128
    with pytest.raises(ParityError, match="unknown preset"):
        get_config("huge")


def test_synthesis_is_deterministic(tiny_ckpt, tmp_path):
    again = synthesize("tiny", seed=0, out=tmp_path / "again", dtype="fp32")
    for f in sorted(p.name for p in tiny_ckpt.iterdir()):
        assert (again / f).read_bytes() == (tiny_ckpt / f).read_bytes(), f
    other = synthesize("tiny", seed=1, out=tmp_path / "other", dtype="fp32")
    assert (other / "model.safetensors").read_bytes() != (tiny_ckpt / "model.safetensors").read_bytes()


def test_synthesis_gives_the_same_bytes_under_every_cpu_capability(tiny_ckpt, tmp_path):
    import os
    import subprocess
    import sys

    best = torch.backends.cpu.get_cpu_capability()
    caps = {"AVX512": ["default", "avx2", "avx512"], "AVX2": ["default", "avx2"]}.get(best, ["default"])
    root = Path(__file__).resolve().parents[1]
    for cap in caps:
        out = tmp_path / cap
        code = f"from reference_models.synth import synthesize; synthesize('tiny', seed=0, out={str(out)!r}, dtype='fp32')"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "PYTHONPATH": str(root)}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=300)
        for f in sorted(p.name for p in tiny_ckpt.iterdir() if p.suffix == ".safetensors"):
            assert (out / f).read_bytes() == (tiny_ckpt / f).read_bytes(), (cap, f)


def test_synthesis_refuses_to_overwrite(tiny_ckpt, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointExistsError, match="--force"):
        synthesize("tiny", seed=0, out=out)
    from reference_models.synth import main

    assert main(["--preset", "tiny", "--out", str(out)]) == 2


def test_synthesized_weights_do_not_hide_bugs(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    cfg = get_config("tiny")
    norms = [k for k in sd if "norm.weight" in k]
    assert norms and all(not torch.all(sd[k] == 1) for k in norms)
    for suffix in ("sinks", "position_bias", "e_score_correction_bias"):
        keys = [k for k in sd if k.endswith(suffix)]
        assert keys and all(sd[k].abs().min() > 0 for k in keys), suffix
    tables = [k for k in sd if k.endswith("tid2eid")]
    assert len(tables) == cfg.mlp_layer_types.count("hash_moe")
    for k in tables:
        t = sd[k]
        assert t.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
        assert t.min() >= 0 and t.max() < cfg.n_routed_experts
        assert (t[:, 0] != t[:, 1]).all()  # distinct experts per token
        assert len(t.unique()) == cfg.n_routed_experts


def test_model_loads_offline_and_activations_stay_order_one(tiny_model):
    ids = torch.randint(3, 4096, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_model(ids, output_hidden_states=True)
    rms = [h.pow(2).mean().sqrt().item() for h in out.hidden_states]
    assert len(rms) == tiny_model.config.num_hidden_layers + 1
    assert all(0.5 < r < 3.0 for r in rms), rms
    assert torch.isfinite(out.logits).all()
    assert 1.0 < out.logits.std(-1).mean().item() < 10.0


def test_precisions(tiny_ckpt, tiny_model):
    ids = torch.randint(3, 4096, (1, 24), generator=torch.Generator().manual_seed(1))
    fp64 = load_reference(tiny_ckpt, "fp64")
    bf16 = load_reference(tiny_ckpt, "bf16")
    assert fp64.model.embed_tokens.weight.dtype == torch.float64
    assert bf16.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref = fp64(ids).logits
        rel32 = ((tiny_model(ids).logits.double() - ref).norm() / ref.norm()).item()
        rel16 = ((bf16(ids).logits.double() - ref).norm() / ref.norm()).item()
    assert rel32 < 1e-5 and rel16 < 0.3


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_gives_a_clear_error(tiny_ckpt, tmp_path, missing):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    (ck / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        if missing == "tokenizer.json":
            load_tokenizer(ck)
        else:
            load_reference(ck)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_reference(tmp_path / "nowhere")


GSM8K_SAMPLES = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    "  Spaces,\ttabs and unicode: café ½ — 3×4 = 12 ",
]


def test_tokenizer_round_trips_gsm8k_text(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert len(tok) == 4096
    texts = list(GSM8K_SAMPLES)
    from runners.demo import default_data_path

    data = default_data_path()
    if data.is_file():
        with open(data, encoding="utf-8") as fh:
            for _, line in zip(range(50), fh):
                row = json.loads(line)
                texts += [row["question"], row["answer"]]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and max(ids) < 4096
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_committed_tokenizer_matches_the_training_script():
    from reference_models.train_tokenizer import DEFAULT_OUT, SPECIAL_TOKENS

    tok = json.loads((Path(DEFAULT_OUT) / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert added == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert len(tok["model"]["vocab"]) == 4096
