"""In-process sources: the engine (a stand-in module here) and the greedy
reference generator (over a scripted model and a character tokenizer)."""

import json
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

from gate_fixtures import answer_of, last_question, synth_docs, write_gsm8k
from parity.cli import cli

DOCS = synth_docs(4)


@pytest.fixture
def data(tmp_path):
    return write_gsm8k(tmp_path, n_test=4)[0]


@pytest.fixture
def fake_engine(monkeypatch):
    calls = []

    @dataclass
    class Result:
        text: str

    class Engine:
        def __init__(self, ckpt, precision=None):
            calls.append(("init", ckpt, precision))

        def generate(self, prompts, max_new_tokens, greedy, stop):
            calls.append(("generate", len(prompts), max_new_tokens, greedy, tuple(stop)))
            # Text past the stop sequence: the gate must cut it.
            return [Result(f" ok\n#### {answer_of(last_question(p), DOCS)}\n\nQuestion: 5") for p in prompts]

    mod = types.ModuleType("runners.engine")
    mod.Engine = Engine
    monkeypatch.setitem(sys.modules, "runners.engine", mod)
    return calls


def test_engine_source(tmp_path, data, fake_engine):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    r = CliRunner().invoke(cli, ["gate", "gsm8k", "--engine", str(ckpt), "--precision", "bf16",
                                 "--data", str(data), "--batch-size", "3", "--min-accuracy", "1",
                                 "--score", "flexible-extract", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert fake_engine[0] == ("init", str(ckpt), "bf16")
    gens = [c for c in fake_engine if c[0] == "generate"]
    assert [g[1] for g in gens] == [3, 1]
    assert gens[0][2:] == (256, True, ("Question:", "</s>", "<|im_end|>"))


def test_engine_unavailable_is_exit_2(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "runners.engine", None)  # import raises ImportError
    r = CliRunner().invoke(cli, ["gate", "gsm8k", "--engine", str(tmp_path), "--data", str(data),
                                 "--no-progress"])
    assert r.exit_code == 2
    assert "--engine needs the engine's own packages" in r.output and "Traceback" not in r.output


def test_parity_does_not_import_runners_or_reference_models():
    import subprocess

    # parity.cli itself loads installed engines' commands (entry points), by design.
    code = ("import sys, parity.gate.run, parity.gate.clients, parity.gate.outdir; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('runners', 'reference_models')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------- reference generator

class CharTokenizer:
    """One token per character; id 0 is EOS."""

    eos_token_id = 0
    chars = "\n #0123456789:?.,*=<>$ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

    def encode(self, text):
        return [self.chars.index(c) + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[i - 1] for i in ids if i != 0 or not skip_special_tokens)


class ScriptedLM(torch.nn.Module):
    """Emits ``script`` token by token, then EOS; checks the cache is used."""

    def __init__(self, script, tok):
        super().__init__()
        self.ids = tok.encode(script) + [0]
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        step = 0 if past_key_values is None else past_key_values + 1
        self.seen.append(input_ids.shape[1])
        logits = torch.zeros(1, input_ids.shape[1], 100)
        logits[0, -1, self.ids[min(step, len(self.ids) - 1)]] = 1.0
        return types.SimpleNamespace(logits=logits, past_key_values=step)


def test_reference_generator_stops():
    from runners.reference_generate import ReferenceGenerator

    tok = CharTokenizer()
    gen = ReferenceGenerator(ScriptedLM("Sam has 6 pens.\n#### 6\n\nQuestion: more", tok), tok)
    out = gen.generate(["Question: x?\nAnswer:"], max_new_tokens=100, stop=["Question:"])
    assert out == ["Sam has 6 pens.\n#### 6\n\n"]
    # Prefill once, then one token per step through the cache.
    assert gen.model.seen[0] == len("Question: x?\nAnswer:") and set(gen.model.seen[1:]) == {1}

    gen = ReferenceGenerator(ScriptedLM("#### 6", tok), tok)
    assert gen.generate(["Q"], max_new_tokens=100, stop=["Question:"]) == ["#### 6"]   # EOS
    gen = ReferenceGenerator(ScriptedLM("#### 6", tok), tok)
    assert gen.generate(["Q"], max_new_tokens=3, stop=[]) == ["###"]                   # budget


def test_reference_source_through_cli(tmp_path, data, monkeypatch):
    import runners.reference_generate as rg

    tok = CharTokenizer()
    loaded = []

    def from_checkpoint(ckpt, precision, device):
        loaded.append((ckpt, precision, device))
        return rg.ReferenceGenerator(ScriptedLM("So 99.\n#### 99", tok), tok)

    monkeypatch.setattr(rg.ReferenceGenerator, "from_checkpoint", staticmethod(from_checkpoint))
    r = CliRunner().invoke(cli, ["gate", "gsm8k", "--reference", str(tmp_path), "--data", str(data),
                                 "--num-fewshot", "0", "--out-dir", str(tmp_path / "o"), "--no-progress",
                                 "--min-accuracy", "0.5"])
    assert r.exit_code == 1, r.output
    assert loaded == [(str(tmp_path), None, None)]
    rec = json.loads((tmp_path / "o" / "samples.jsonl").read_text().splitlines()[0])
    assert rec["answer_strict"] == "99" and rec["correct_strict"] is False
