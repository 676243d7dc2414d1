"""The engine at TP=2 on the CPU (gloo over loopback): the TP=1 tokens and
per-layer agreement with TP=1, no false alarm against the reference, and the
tensor-parallel bugs of the zoo localized to their layer, stage and rank.

One torchrun launch of two ranks runs every TP job (tests/tp_probe.py), so
the imports and the process group are paid once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tiny-gsm8k"
PRESET = "deepseek_v4"
NEW_TOKENS = 2  # the prefill and one decode step
LAUNCH_TIMEOUT_S = 420
NOISE = 2  # members of the TP=1 engine's noise ensemble

pytestmark = [pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="tiny checkpoint not committed"),
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.usefixtures("one_torch_thread")]

# fault -> (layer, stage layer-bisect must name, rank it must name or None for every rank)
FAULTS = {
    "tp_missing_all_reduce": (0, "self_attn:output", None),
    "tp_shared_expert_every_rank": (0, "mlp:output", None),
    "tp_heads_strided": (0, "self_attn.q_b_proj:output", None),
    "tp_sinks_offset": (0, "self_attn.o_a_proj:output", 1),
    "tp_expert_offset": (0, "mlp.experts:output", None),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt_ids() -> list[list[int]]:
    from runners.demo import BUILTIN_QUESTIONS
    from runners.engine.engine import _load_tokenizer

    tok = _load_tokenizer(CKPT)
    return [tok.encode(f"Question: {BUILTIN_QUESTIONS[0]['question']}\nAnswer:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every TP=2 job in one launch: {name: dump}, plus the tokens each generated."""
    out = tmp_path_factory.mktemp("tp")
    prompts = _prompt_ids()
    jobs = [{"name": "clean", "fault": None, "weights": True}]
    jobs += [{"name": f, "fault": f, "weights": f == "tp_expert_offset"} for f in FAULTS]
    spec = out / "jobs.json"
    spec.write_text(json.dumps({"prompts": prompts, "new_tokens": NEW_TOKENS, "jobs": jobs}))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in ("PARITY_DUMP_DIR", "PARITY_ENGINE_FAULT", "PARITY_WEIGHT_DUMP_DIR", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(ROOT / "tests" / "tp_probe.py"), "--ckpt", str(CKPT),
           "--out", str(out), "--jobs", str(spec)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    tokens = json.loads((out / "tokens.json").read_text())
    return {"out": out, "prompts": prompts, "tokens": tokens}


@pytest.fixture(scope="module")
def single(runs):
    """The TP=1 engine on the same prompts, and a noise ensemble of it
    (every leaf module's output off by one rounding on 1 % of its elements)."""
    from parity import capture
    from parity.config import CaptureConfig
    from parity.noise import perturbed
    from runners.engine import Engine
    from tp_probe import _all_prompt_logits, _env, run_job

    out = runs["out"] / "tp1"
    tokens = run_job(str(CKPT), out, runs["prompts"], NEW_TOKENS, {"name": "clean"})
    members = []
    for k in range(NOISE):
        with _env(PARITY_DUMP_DIR=None, PARITY_ENGINE_FAULT=None, PARITY_WEIGHT_DUMP_DIR=None):
            engine = Engine(CKPT, max_num_seqs=1, max_model_len=128, tp=1)
        dump = out / f"noise-{k}"
        with perturbed(engine.model, k):
            # after the perturbation's hooks, so the records are the perturbed outputs
            engine.capture = capture.install(engine.model, CaptureConfig.from_env().replace(dump_dir=str(dump)),
                                             run_info=engine.run_info)
            _all_prompt_logits(engine)
            res = engine.generate(runs["prompts"], max_new_tokens=NEW_TOKENS, greedy=True, ignore_eos=True)
            engine.capture.set_run_info(token_ids=[p + list(r.token_ids) for p, r in zip(runs["prompts"], res)])
            engine.capture.close()
        members.append(dump)
    return {"dump": out / "clean", "tokens": tokens, "noise": members}


@pytest.fixture(scope="module")
def refs(runs):
    """The reference forced on each distinct continuation the TP jobs made,
    and its weights."""
    from parity.capture import dump_weights
    from reference_models.load import load_reference
    from runners.reference import run_reference

    model = load_reference(CKPT, precision="fp32", device="cpu")
    out, dumps = runs["out"] / "ref", {}
    for name, gen in runs["tokens"].items():
        key = json.dumps(gen)
        if key not in dumps:
            dumps[key] = run_reference(CKPT, runs["prompts"], dump=out / f"r{len(dumps)}", model=model,
                                       force_tokens=gen, stop_at_eos=False).dump_dir
    dump_weights(model, str(out / "weights"))
    return {name: dumps[json.dumps(gen)] for name, gen in runs["tokens"].items()} | {"weights": out / "weights"}


def _bisect(ref, target):
    from parity import layer_bisect

    return layer_bisect(ref, target, preset=PRESET)


# ---------------------------------------------------------------- the clean TP engine


def test_every_rank_writes_its_folder_and_declares_its_layout(runs):
    from parity.store.reader import open_dump

    d = open_dump(str(runs["out"] / "clean"))
    assert d.run["world_size"] == 2 and d.run["tensor_parallel"] == 2 and d.run["complete"]
    assert sorted(d.rank_dirs) == [0, 1]
    layout = {}
    for r in d.records():
        layout.setdefault((r.key, r.rank), (r.meta.get("shard_dim"), r.meta.get("shard_reduce"), r.shape))
    L = "model.layers.0."
    assert layout[(L + "self_attn.q_b_proj:output", 1)][:2] == (-1, None)
    assert layout[(L + "self_attn.o_a_proj:output", 0)][:2] == (-2, None)
    assert layout[(L + "self_attn.o_b_proj:output", 0)][:2] == (None, "sum")
    assert layout[(L + "mlp.experts:output", 1)][:2] == (None, "sum")
    assert layout[(L + "self_attn:output.0", 1)][:2] == (None, None)  # replicated after the all-reduce
    assert layout[("lm_head:output", 0)][:2] == (-1, None)
    assert layout[("lm_head:output", 0)][2][-1] == 2048  # half the vocabulary


def test_tp2_gives_the_tp1_tokens_and_agrees_per_layer(runs, single):
    from parity import compare_dumps

    assert runs["tokens"]["clean"] == single["tokens"]
    exact = compare_dumps(single["dump"], runs["out"] / "clean", preset=PRESET)
    t = exact.table
    assert not exact.failed and len(t)
    # Everything before the first row-parallel product is bitwise TP=1's:
    # column-parallel shards, gathered heads, the attention of each head.
    first = t.index[t["frac_equal"] < 1][0]
    assert t.loc[first, "key"] == "model.layers.0.self_attn.o_b_proj:output", t.loc[first, "key"]
    assert (t.loc[:first - 1, "frac_equal"] == 1).all()
    # (a routing margin is a difference of close scores, judged with its decision)
    worst = t[~t["key"].str.contains("topk_margin")].groupby("key")["rel_l2"].max()
    assert worst.max() < 1e-6, worst.sort_values().tail()
    noisy = compare_dumps(single["dump"], runs["out"] / "clean", preset=PRESET, noise=single["noise"])
    assert not noisy.failed, noisy.table[noisy.table["verdict"] == "fail"][["key", "rel_l2", "reason"]].head()


def test_clean_tp_engine_raises_no_alarm(runs, refs):
    from parity.cli import cli

    b = _bisect(refs["clean"], runs["out"] / "clean")
    assert b.key is None and not b.compare.failed, b.message
    r = CliRunner().invoke(cli, ["ref-vs-target", "--ref", str(refs["clean"]), "--target",
                                 str(runs["out"] / "clean"), "--preset", PRESET], catch_exceptions=False)
    assert r.exit_code == 0, r.output[-2000:]


def test_clean_tp_weights_reassemble(runs, refs):
    from parity.compare.weights import compare_weights

    res = compare_weights(refs["weights"], runs["out"] / "clean-weights", preset=PRESET)
    assert len(res.table) and not res.failed, res.table[res.table["verdict"] == "fail"].head()


# ---------------------------------------------------------------- the TP faults


@pytest.mark.parametrize("fault", list(FAULTS))
def test_layer_bisect_localizes_the_tp_fault(runs, refs, fault):
    layer, stage, rank = FAULTS[fault]
    b = _bisect(refs[fault], runs["out"] / fault)
    assert (b.layer, b.stage) == (layer, stage), b.message
    if rank is not None:
        assert f"rank {rank}" in b.message, b.message
        rows = b.compare.table
        bad = rows[(rows["key"] == f"model.layers.{layer}.{stage}") & (rows["verdict"] == "fail")]
        assert set(bad["rank"]) == {rank} and bad["reason"].str.contains(f"rank {rank}'s shard is off").all()


def test_weights_name_the_rank_of_a_wrong_expert_shard(runs, refs):
    from parity.compare.weights import compare_weights

    res = compare_weights(refs["weights"], runs["out"] / "tp_expert_offset-weights", preset=PRESET)
    bad = res.table[res.table["verdict"] == "fail"]
    assert set(bad["stage"]) == {"mlp.experts.gate_up_proj:weight", "mlp.experts.down_proj:weight"}, bad
    assert set(bad["layer"]) == set(range(6)) and set(bad["rank"]) == {1}
    assert bad["reason"].str.contains(re.escape("rank 1's shard is off, rank 0's agrees")).all()
