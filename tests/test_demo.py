"""`parity demo` end to end on the tiny checkpoint (fewer questions and
steps than the default, same code path), its exit codes, and its inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tiny-gsm8k"
needs_ckpt = pytest.mark.skipif(not (CKPT / "config.json").is_file(), reason="tiny checkpoint not committed")
SMALL = ["--questions", "2", "--decode-steps", "2", "--no-progress"]


def _demo(*args):
    from parity.cli import cli

    return CliRunner().invoke(cli, ["demo", *args], catch_exceptions=False)


@needs_ckpt
def test_clean_demo_agrees_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    r = _demo("--out", str(out), *SMALL)
    assert r.exit_code == 0, r.output
    for line in ("ref-vs-target:   pass", "layer-bisect:    no divergence", "slot-invariance:", "verdict:         agreement"):
        assert line in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is False and summary["ref_vs_target"]["fail"] == 0
    assert summary["slot_invariance"]["status"] in ("pass", "warn")
    md = (out / "summary.md").read_text()
    assert "## layer-bisect" in md and "## slot-invariance" in md
    for plot in summary["plots"]:
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in md
    assert (out / "dumps" / "index.json").is_file()

    # A second run into the same folder is refused before anything runs.
    again = _demo("--out", str(out), *SMALL)
    assert again.exit_code == 2 and "not empty" in again.output


def _slot_fault(layer=2, slot=1, size=1e-2):
    """A slot-dependent bug from outside the engine: layer ``layer``'s
    attention output is off for whatever sequence sits in cache slot ``slot``."""
    def patch(engine):
        attn = engine.model.model.layers[layer].self_attn

        def hook(module, args, out):
            meta = engine.last_meta
            x = (out[0] if isinstance(out, tuple) else out).clone()
            for i, s in enumerate(meta.slots):
                if s == slot:
                    x[meta.cu_seqlens[i]:meta.cu_seqlens[i + 1]] += size * x.abs().mean()
            return (x, *out[1:]) if isinstance(out, tuple) else x

        # prepend: the capture hook then records the wrong output, as it would a real bug's.
        attn.register_forward_hook(hook, prepend=True)
    return patch


@needs_ckpt
def test_demo_finds_a_slot_fault(tmp_path):
    from runners.demo import run_demo

    res = run_demo(tmp_path / "report", questions=2, decode_steps=1, progress=False, patch_engine=_slot_fault())
    assert res.exit_code == 1
    assert res.slots.status == "fail"
    first = res.slots.first.iloc[0]
    assert (first["slot"], first["layer"]) == (1, 2) and first["stage"].startswith("self_attn")
    # The target run is a batch too, so ref-vs-target sees the bug in sequence 1.
    assert res.bisect.layer == 2
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["exit_code"] == 1


@needs_ckpt
def test_demo_finds_a_fault_of_the_zoo(tmp_path):
    pytest.importorskip("runners.engine.faults")
    r = _demo("--out", str(tmp_path / "report"), "--fault", "skip_inverse_rope", "--questions", "2",
              "--decode-steps", "1", "--no-progress")
    assert r.exit_code == 1, r.output
    assert "fault: skip_inverse_rope" in r.output and "ref-vs-target:   FAIL" in r.output
    assert "error enters at layer 0" in r.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["fault"] == "skip_inverse_rope" and summary["layer_bisect"]["layer"] == 0


def test_a_fault_runs_at_a_precision_where_it_acts():
    pytest.importorskip("runners.engine.faults")
    from runners.demo import choose_precision
    from parity.errors import ParityError

    assert choose_precision(None, None) == "fp32"
    assert choose_precision("skip_inverse_rope", None) == "fp32"
    assert choose_precision("fp8_unscaled_o_a", None) == "fp8"
    with pytest.raises(ParityError, match="acts only at fp8"):
        choose_precision("fp8_unscaled_o_a", "fp32")


def test_unknown_fault_is_bad_input(tmp_path):
    r = _demo("--out", str(tmp_path / "x"), "--fault", "no-such-fault", *SMALL)
    assert r.exit_code == 2
    assert "fault" in r.output and not (tmp_path / "x").exists()


def test_bad_options_are_bad_input(tmp_path):
    assert _demo("--out", str(tmp_path / "x"), "--questions", "0", "--no-progress").exit_code == 2
    assert _demo("--out", str(tmp_path / "y"), "--decode-steps", "-1").exit_code == 2
    f = tmp_path / "file"
    f.write_text("x")
    assert _demo("--out", str(f), *SMALL).exit_code == 2


def test_force_replaces_only_the_demo_files(tmp_path):
    from runners.demo import prepare_out

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.png").write_bytes(b"x")
    (tmp_path / "summary.md").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    prepare_out(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_builtin_questions_when_gsm8k_is_missing(tmp_path, monkeypatch):
    import runners.demo as demo
    from runners.demo import demo_prompts

    monkeypatch.setattr(demo, "default_data_path", lambda: tmp_path / "missing.jsonl")
    prompts, source = demo_prompts(3, None)
    assert len(prompts) == 3 and source.startswith("built-in")
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in prompts)


def test_synthesizes_the_tiny_preset_when_the_checkpoint_is_missing(tmp_path, monkeypatch):
    import runners.demo as demo

    monkeypatch.setattr(demo, "_repo_root", lambda: tmp_path / "repo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    said = []
    ckpt = demo.resolve_checkpoint(None, said.append)
    assert ckpt == tmp_path / "cache" / "parity" / "tiny-seed0"
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file() and said
    # Cached: the second call synthesizes nothing.
    assert demo.resolve_checkpoint(None, said.append) == ckpt and len(said) == 1


def test_bf16_demo_judges_by_a_noise_model(tmp_path):
    r = _demo("--out", str(tmp_path / "report"), "--precision", "bf16", "--questions", "1", "--decode-steps", "1",
              "--no-progress")
    assert r.exit_code == 0, r.output
    assert "(noise model: 4 perturbed reference runs)" in r.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["noise_members"] == 4 and summary["noise_floor"] is False
    assert "--noise dumps/noise-3" in (tmp_path / "report" / "summary.md").read_text()
