"""`parity demo`: the whole loop on the tiny checkpoint, on the CPU.

Runs the reference and the engine side by side on a few GSM8K questions,
then ref-vs-target, layer-bisect and slot-invariance on their dumps, and
writes a report folder (summary.md, summary.json, tables, PNG plots, and the
dumps themselves so every command can be re-run by hand).

The command belongs to this repository's engine, not to parity: it plugs
into the ``parity`` command line through the ``parity.commands`` entry point
(pyproject.toml), as any engine's own commands can.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from parity.errors import ParityError
from parity.outdir import prepare_out as _prepare_out

DEFAULT_OUT = "parity-demo"
DEFAULT_CKPT = "checkpoints/tiny-gsm8k"
PRESET = "deepseek_v4"
# Everything the demo writes into --out; --force removes only these.
_OWNED = ("summary.md", "summary.json", "compare.csv", "bisect.csv", "slots.csv", "plots", "dumps")

# Used when the GSM8K test split is not on disk: short questions in GSM8K's
# style, so the demo runs anywhere the repository does.
BUILTIN_QUESTIONS = [
    {"question": "Tom has 3 boxes of apples with 4 apples in each box. He gives 2 apples to his sister and eats "
                 "1 apple. How many apples does Tom have left?",
     "answer": "Tom has 3 * 4 = <<3*4=12>>12 apples. He has 12 - 2 - 1 = <<12-2-1=9>>9 apples left.\n#### 9"},
    {"question": "A pen costs $2 and a notebook costs $5. Maria buys 3 pens and 2 notebooks for school. How "
                 "much money does Maria spend in total?",
     "answer": "The pens cost 3 * 2 = <<3*2=6>>6 dollars. The notebooks cost 2 * 5 = <<2*5=10>>10 dollars. "
               "She spends 6 + 10 = <<6+10=16>>16 dollars.\n#### 16"},
    {"question": "Sara reads 12 pages of her book every day. Her book has 100 pages. How many pages are left "
                 "to read after one week?",
     "answer": "In one week she reads 12 * 7 = <<12*7=84>>84 pages. 100 - 84 = <<100-84=16>>16 pages are "
               "left.\n#### 16"},
    {"question": "A train travels 60 miles every hour. It leaves at 9 am and arrives at 12 pm. How many miles "
                 "does the train travel?",
     "answer": "It travels for 12 - 9 = <<12-9=3>>3 hours, so 60 * 3 = <<60*3=180>>180 miles.\n#### 180"},
    {"question": "There are 25 students in a class and 5 tables. Each table gets the same number of students. "
                 "How many students sit at each table?",
     "answer": "25 / 5 = <<25/5=5>>5 students sit at each table.\n#### 5"},
]


# ---------------------------------------------------------------- inputs


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_data_path() -> Path:
    """GSM8K's test split where this repository's machines keep it (next to
    the checkout, never inside it), unless PARITY_GSM8K_DATA says otherwise."""
    from parity.gate.task import default_data_path as named

    return named() or _repo_root().parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parity"


def resolve_checkpoint(ckpt: str | None, say=lambda msg: None) -> Path:
    """The checkpoint to run: the one given, else the committed trained tiny
    checkpoint, else the tiny preset synthesized with seed 0 (cached)."""
    if ckpt is not None:
        p = Path(ckpt)
        if not (p / "config.json").is_file():
            raise ParityError(f"--ckpt {p}: no config.json there")
        return p
    committed = _repo_root() / DEFAULT_CKPT
    if (committed / "config.json").is_file():
        return committed
    synth = _cache_dir() / "tiny-seed0"
    if not (synth / "config.json").is_file():
        say(f"{committed} is missing; synthesizing the tiny preset (seed 0) into {synth}")
        from reference_models.synth import synthesize

        synthesize("tiny", seed=0, out=synth, force=True)
    return synth


def demo_prompts(n: int, data: str | None) -> tuple[list[str], str]:
    """``n`` 0-shot GSM8K prompts and where they came from."""
    from parity.gate.task import doc_to_text, load_docs

    if n < 1:
        raise ParityError("--questions must be >= 1")
    path = Path(data) if data else default_data_path()
    if data and not path.is_file():
        raise ParityError(f"--data {path}: no such file")
    if path.is_file():
        docs = load_docs(path)[:n]
        source = f"GSM8K test ({path}), first {len(docs)}"
    else:
        docs = BUILTIN_QUESTIONS[:n]
        source = f"built-in questions ({path} not found), first {len(docs)}"
    return [doc_to_text(d) for d in docs], source


def choose_precision(fault: str | None, precision: str | None) -> str:
    """Check the fault name and pick the precision: the one given, else fp32,
    else (for a fault that acts only at some precisions) fp8 or the first
    it acts at. A fault that would do nothing at the given precision is bad
    input: the demo would report a clean engine with the fault "on"."""
    if not fault:
        return precision or "fp32"
    import runners.side_by_side as sbs

    names = sbs.known_faults()
    if fault not in names:
        raise ParityError(f"unknown fault {fault!r} (known: {', '.join(names)})")
    acts = sbs.fault_precisions(fault)
    if acts is None:
        return precision or "fp32"
    if precision is None:
        return "fp8" if "fp8" in acts else acts[0]
    if precision not in acts:
        raise ParityError(f"fault {fault!r} acts only at {' and '.join(acts)}; give --precision {acts[0]} "
                          f"or leave --precision out")
    return precision


def prepare_out(out: Path, force: bool) -> None:
    _prepare_out(out, force, lambda name: name in _OWNED,
                 hint="give --force to replace a previous demo's files in it")


# ---------------------------------------------------------------- verdicts


# ---------------------------------------------------------------- the run


@dataclass
class DemoResult:
    out: Path
    side: object                # runners.side_by_side.SideBySide
    compare: object             # parity.compare.api.CompareResult
    bisect: object              # parity.bisect.BisectResult
    slots: object               # parity.slots.SlotResult
    source: str
    plots: list[str]
    timings: dict[str, float]

    @property
    def diverged(self) -> bool:
        return self.compare.failed or self.bisect.key is not None or self.slots.status == "fail"

    @property
    def exit_code(self) -> int:
        return 1 if self.diverged else 0


class _Progress:
    """One tqdm bar over the demo's stages, on stderr."""

    def __init__(self, stages: list[str], enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(stages), file=sys.stderr, unit="step", leave=True,
                            bar_format="{desc:<34}{bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
        self.started = False

    def stage(self, name: str) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description_str(name)

    def close(self) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.set_description_str("done")
            self.bar.close()


def _quiet_loading():
    """Silence transformers' per-load progress bars, which would interleave
    with the demo's own; returns the function that restores them."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if was else (lambda: None)


_ENGINE_STAGE = {"target": "engine: all prompts (target)", "ref": "reference, forced on engine tokens",
                 "floor": "reference in fp64 (floor)", "batched": "engine: batched run"}


def run_demo(out, *, ckpt=None, questions: int = 3, decode_steps: int = 4, precision: str | None = None,
             fault: str | None = None, data: str | None = None, force: bool = False, progress: bool = True,
             floor: bool | None = None, noise: int | None = None, patch_engine=None,
             prefill_chunk: int | None = None) -> DemoResult:
    """Everything ``parity demo`` does; returns what it found. ``precision``
    None: fp32, or what ``fault`` needs. ``floor``: also run the reference in
    fp64 and judge by the noise floor instead of fixed thresholds; None: for
    bf16 and fp8, where the model's fp32 records (hyper-connections, sinks)
    inherit bf16 error from their inputs and fixed fp32 limits misfire.
    ``noise``: members of a noise ensemble (perturbed reference runs) to judge
    by instead; None: 4 for bf16 and fp8 (where fixed thresholds and the
    floor raise false alarms after near-tie flips: docs/calibration.md), 0
    for fp32. With a noise model the floor is off unless asked for."""
    import torch

    from parity.bisect import layer_bisect
    from parity.compare.api import compare_dumps
    from parity.slots import slot_invariance

    out = Path(out)
    t_start = time.perf_counter()
    precision = choose_precision(fault, precision)
    if noise is None:
        noise = 0 if precision == "fp32" else 4
    if noise < 0:
        raise ParityError("--noise must be >= 0")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ParityError("--prefill-chunk must be >= 1")
    prepare_out(out, force)
    prompts, source = demo_prompts(questions, data)
    say = lambda msg: click.echo(f"parity demo: {msg}", err=True)
    ckpt = resolve_checkpoint(ckpt, say)
    import runners.side_by_side as sbs

    if floor is None:
        floor = precision != "fp32" and noise == 0
    distinct = len(prompts)
    stages = (["engine: all prompts (target)", "reference, forced on engine tokens"]
              + (["reference in fp64 (floor)"] if floor else [])
              + [f"reference, noise member {k}" for k in range(noise)] + ["engine: batched run"]
              + [f"engine: prompt {i} alone" for i in range(distinct)]
              + ["ref-vs-target", "layer-bisect", "slot-invariance", "plots and report"])
    bar = _Progress(stages, progress)
    timings: dict[str, float] = {}
    # The tiny model's matmuls are small: one thread is faster than two on a
    # shared machine, and every run of the demo then sums in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    quiet = _quiet_loading()
    try:
        side = sbs.run_side_by_side(
            ckpt, prompts, out / "dumps", precision=precision, decode_steps=decode_steps, fault=fault,
            floor=floor, noise=noise, force=True, patch_engine=patch_engine, prefill_chunk=prefill_chunk,
            on_stage=lambda s: bar.stage(_ENGINE_STAGE.get(s) or (
                f"reference, noise member {s[6:]}" if s.startswith("noise-") else f"engine: prompt {s[5:]} alone")))
        timings.update(side.timings)
        t = time.perf_counter()
        bar.stage("ref-vs-target")
        model = None
        if side.noise:
            from parity.noise import noise_model

            model = noise_model(side.ref, side.noise, preset=PRESET)
        cmp = compare_dumps(side.ref, side.target, preset=PRESET, floor=side.floor, noise=model)
        timings["ref-vs-target"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        bar.stage("layer-bisect")
        bis = layer_bisect(side.ref, side.target, compare=cmp)
        timings["layer-bisect"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        bar.stage("slot-invariance")
        # the engine's run.json declares whether it promises batch invariance;
        # a noise model, when there is one, sizes the rounding otherwise
        slots = slot_invariance(side.batched, [str(p) for p in side.solos], filter=sbs.SLOT_FILTER,
                                noise=model, preset=PRESET if model is not None else None)
        timings["slot-invariance"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        bar.stage("plots and report")
        from parity.report.plots import compare_plots, slot_plots

        plots = compare_plots(cmp.table, bis.curve, str(out / "plots")) + slot_plots(slots.table, str(out / "plots"))
        timings["plots"] = round(time.perf_counter() - t, 3)
        res = DemoResult(out, side, cmp, bis, slots, source, plots, timings)
        timings["total"] = round(time.perf_counter() - t_start, 3)
        write_report(res, ckpt, precision, fault, decode_steps)
    finally:
        torch.set_num_threads(threads)
        quiet()
        bar.close()
    return res


# ---------------------------------------------------------------- rendering


def _decode(ckpt, ids) -> str:
    try:
        from reference_models.load import load_tokenizer

        return load_tokenizer(ckpt).decode(ids)
    except Exception:  # noqa: BLE001 - text is decoration; the ids are in index.json
        return ""


def _compare_line(cmp) -> str:
    s = cmp.summary()
    line = f"{s['pairs']} aligned pairs: {s['pass']} pass, {s['warn']} warn, {s['fail']} fail"
    if "first_failure" in s:
        line += f"; first failure {s['first_failure']}"
    return line


def summary_lines(res: DemoResult) -> list[str]:
    idx = res.side.index
    fault = idx.get("fault") or "none"
    verdict = "DIVERGENCE FOUND" if res.diverged else "agreement"
    return [
        f"checkpoint:      {idx['checkpoint']}",
        f"prompts:         {res.source}; {idx['precision']}; {idx['decode_steps']} decode steps; fault: {fault}",
        f"ref-vs-target:   {'FAIL' if res.compare.failed else 'pass'}: {_compare_line(res.compare)}"
        + (f" (noise model: {len(res.side.noise)} perturbed reference runs)" if res.side.noise else
           " (noise floor: fp64 reference)" if res.compare.floor else ""),
        f"layer-bisect:    {res.bisect.message}",
        f"slot-invariance: {res.slots.status.upper()}: {res.slots.message}",
        f"verdict:         {verdict} (exit {res.exit_code})",
        f"report:          {res.out / 'summary.md'} ({len(res.plots)} plots) in {res.timings.get('total', 0):.0f} s",
    ]


def _md_table(df, cols, n=None) -> str:
    from parity.report.tables import to_markdown

    df = df[[c for c in cols if c in df]]
    return to_markdown(df if n is None else df.head(n))


def write_report(res: DemoResult, ckpt, precision, fault, decode_steps) -> None:
    out, idx, cmp, bis = res.out, res.side.index, res.compare, res.bisect
    cmp.table.to_csv(out / "compare.csv", index=False)
    bis.curve.to_csv(out / "bisect.csv", index=False)
    res.slots.table.to_csv(out / "slots.csv", index=False)
    d = "dumps"
    solos = " ".join(f"--solo {d}/{p}" for p in idx["dumps"]["solo"])
    judge_opts = (f" --floor {d}/floor" if cmp.floor else "") + \
        "".join(f" --noise {d}/{p}" for p in idx["dumps"].get("noise") or [])
    lines = ["# parity demo", "", "```", *summary_lines(res), "```", ""]
    lines += ["## What ran", "",
              f"The engine (`runners/engine`, {precision}) and the transformers reference read the same token "
              f"ids; the reference was forced on the engine's greedy tokens, so every decode step lines up. "
              f"Fault injected into the engine: **{fault or 'none'}**.", ""]
    lines += ["| # | prompt tokens | engine continuation |", "|---|---|---|"]
    for i, (p, g) in enumerate(zip(idx["prompts"], idx["generated"])):
        text = _decode(ckpt, g).replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {i} | {len(p['token_ids'])} | `{text}` |")
    lines += ["", "## ref-vs-target", "", _compare_line(cmp) + ".", ""]
    if cmp.failed:
        lines += ["Worst rows:", "", _md_table(cmp.table.iloc[cmp.worst(10)],
                                                ["key", "phase", "step", "seq", "rel_l2", "cos", "verdict", "reason"]), ""]
    lines += ["## layer-bisect", "", bis.message + ".", "", _md_table(bis.curve, list(bis.curve.columns)), ""]
    if len(bis.stages):
        st = bis.stages[bis.stages["verdict"] != "pass"]
        lines += [f"Stages of layer {bis.layer} that do not pass:", "",
                  _md_table(st, ["stage", "input_err", "output_err", "growth", "verdict", "meaning", "where"]), ""]
    lines += ["## slot-invariance", "", f"**{res.slots.status}**: {res.slots.message}.", "",
              f"Rule: {res.slots.judge.rule}.", ""]
    if len(res.slots.first):
        lines += [_md_table(res.slots.first, ["slot", "seq", "phase", "step", "layer", "stage", "rel_l2", "reason"]),
                  ""]
    lines += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in res.plots] + [""]
    lines += ["## Re-run by hand", "", "From this folder:", "", "```bash",
              f"parity ref-vs-target --ref {d}/ref --target {d}/target --preset {PRESET}{judge_opts}",
              f"parity layer-bisect --ref {d}/ref --target {d}/target --preset {PRESET}{judge_opts}",
              f"parity slot-invariance --dir {d}/batched {solos} --filter '{idx['slot_filter']}'",
              "```", "", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items()), ""]
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    summary = {
        "diverged": res.diverged, "exit_code": res.exit_code, "checkpoint": idx["checkpoint"], "source": res.source,
        "precision": precision, "decode_steps": decode_steps, "fault": fault, "noise_floor": cmp.floor,
        "noise_members": len(res.side.noise),
        "ref_vs_target": cmp.summary(),
        "layer_bisect": {"layer": bis.layer, "stage": bis.stage, "key": bis.key, "message": bis.message,
                         "entries": bis.entries},
        "slot_invariance": {"status": res.slots.status, "message": res.slots.message, "rule": res.slots.judge.rule,
                            "first": res.slots.first.to_dict(orient="records")},
        "plots": [f"plots/{Path(p).name}" for p in res.plots], "timings_s": res.timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- command


class _FaultOption(click.Option):
    """--fault, whose help lists the bug zoo's names. They are read when the
    help is shown, not at import: parity imports no runner module itself."""

    def get_help_record(self, ctx):
        try:
            from runners.side_by_side import known_faults

            names = known_faults()
        except Exception:  # noqa: BLE001 - the help must show even without the runners
            names = None
        if names:
            self.help = f"{self.help.split(' One of:')[0]} One of: {', '.join(names)}."
        return super().get_help_record(ctx)


@click.command("demo")
@click.option("--out", default=DEFAULT_OUT, show_default=True, metavar="DIR",
              help="Report folder (summary.md, plots, dumps). Refused when not empty, unless --force.")
@click.option("--force", is_flag=True, help="Replace a previous demo's files in --out.")
@click.option("--fault", metavar="NAME", default=None, cls=_FaultOption,
              help="Inject one engine fault from the bug zoo (runners/engine/faults.py, docs/bug-zoo.md) and "
                   "watch parity find it.")
@click.option("--ckpt", metavar="DIR", default=None,
              help=f"Checkpoint (default: {DEFAULT_CKPT}, else the tiny preset synthesized with seed 0).")
@click.option("--questions", "-n", type=int, default=3, show_default=True, help="GSM8K questions (0-shot).")
@click.option("--decode-steps", type=int, default=4, show_default=True, help="Decode forwards after the prefill.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp8"]), default=None,
              help="Engine precision (default fp32, or the one a --fault needs).")
@click.option("--floor/--no-floor", default=None,
              help="Also run the reference in fp64 and judge by the noise floor (default: on for bf16 and fp8 "
                   "without --noise).")
@click.option("--data", metavar="FILE", default=None,
              help="GSM8K test jsonl (default: ../shared/data/gsm8k/test.jsonl; built-in questions when missing).")
@click.option("--noise", type=int, default=None, metavar="K",
              help="Judge by a noise model of K perturbed reference runs (default: 4 for bf16 and fp8, 0 for fp32).")
@click.option("--prefill-chunk", type=int, default=None, metavar="N",
              help="The engine computes each prompt in chunks of N tokens, as serving engines do "
                   "(default: one forward).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def demo(out, force, fault, ckpt, questions, decode_steps, precision, floor, noise, data, prefill_chunk,
         no_progress):
    """Run engine and reference side by side on a few GSM8K questions and check them.

    Prints the ref-vs-target summary, the layer-bisect verdict and the
    slot-invariance verdict, and writes OUT/summary.md with PNG plots.
    Exit 0: the engine agrees with the reference; 1: a divergence was found;
    2: bad input (e.g. an unknown --fault).
    """
    if decode_steps < 0:
        raise ParityError("--decode-steps must be >= 0")
    res = run_demo(out, ckpt=ckpt, questions=questions, decode_steps=decode_steps, precision=precision,
                   fault=fault, data=data, force=force, progress=not no_progress, floor=floor, noise=noise,
                   prefill_chunk=prefill_chunk)
    click.echo("\n".join(summary_lines(res)))
    raise SystemExit(res.exit_code)
