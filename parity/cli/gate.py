"""`parity gate gsm8k` and `parity gate diff`."""

from __future__ import annotations

import click

from parity.cli import cli
from parity.cli._options import output_options
from parity.errors import ParityError

_FILTER_NAMES = ("strict-match", "flexible-extract")


@cli.group("gate")
def gate():
    """Task-level accuracy gates for CI (GSM8K-100)."""


@gate.command("gsm8k")
@click.option("--endpoint", metavar="URL", default=None,
              help="An OpenAI-compatible server (root, /v1 or /v1/completions URL).")
@click.option("--engine", metavar="CKPT", default=None, help="Run this project's engine in process.")
@click.option("--reference", metavar="CKPT", default=None,
              help="Run the transformers reference in process.")
@click.option("--lm-eval-results", metavar="PATH", default=None,
              help="Judge what lm-eval computed instead of generating: its results_*.json, or its "
                   "--output_path folder (the newest run in it, with its samples file).")
@click.option("--lm-eval-samples", metavar="FILE", default=None,
              help="With --lm-eval-results FILE: lm-eval's samples_gsm8k_*.jsonl of that run, for "
                   "per-question records (found by itself in a folder).")
@click.option("--model", metavar="NAME", default=None,
              help="Model name sent to --endpoint (default: the first of its /v1/models).")
@click.option("--concurrency", type=int, default=8, show_default=True,
              help="Requests in flight to --endpoint.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for one --endpoint request.")
@click.option("--retries", type=int, default=4, show_default=True,
              help="Retries per --endpoint request, with exponential backoff from --backoff seconds.")
@click.option("--backoff", type=float, default=1.0, show_default=True, metavar="S",
              help="First wait between --endpoint retries (doubling, at most 30 s).")
@click.option("--precision", default=None, help="Precision for --engine / --reference (e.g. bf16, fp8).")
@click.option("--device", default=None, help="Device for --engine / --reference [default: the engine's own; cuda if available for --reference].")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Prompts per --engine generate call.")
@click.option("--data", "data", metavar="PATH", default=None,
              help="GSM8K test split (jsonl of question/answer) "
                   "[default: the file PARITY_GSM8K_DATA names].")
@click.option("--fewshot-data", metavar="PATH", default=None,
              help="GSM8K train split for the fewshot examples [default: train.jsonl next to --data].")
@click.option("--limit", type=int, default=100, show_default=True, help="First N test questions.")
@click.option("--num-fewshot", type=int, default=3, show_default=True,
              help="Fewshot examples per prompt (lm-eval's gsm8k default is 5).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True,
              help="Generation budget per question (lm-eval's max_gen_toks).")
@click.option("--score", "score", type=click.Choice(_FILTER_NAMES), default="strict-match",
              show_default=True, help="The filter whose accuracy the pass rules read.")
@click.option("--min-accuracy", type=float, default=None, metavar="X",
              help="Fail when accuracy < X.")
@click.option("--baseline", type=float, default=None, metavar="X",
              help="Fail when accuracy < X - K x stderr (K = --tolerance-stderr).")
@click.option("--tolerance-stderr", type=float, default=2.0, show_default=True, metavar="K")
@click.option("--baseline-samples", metavar="FILE", default=None,
              help="A stored run (gate out dir, samples.jsonl, or lm-eval samples jsonl): "
                   "paired comparison, fail on a significant loss (exact McNemar).")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Significance level of the McNemar test.")
@click.option("--min-agreement", type=float, default=None, metavar="X",
              help="With --baseline-samples: fail when fewer than X of the questions get the "
                   "same extracted answer.")
@click.option("--out-dir", metavar="DIR", default=None,
              help="Write summary.json and samples.jsonl (per-question records, each as it is "
                   "answered) here.")
@click.option("--resume", is_flag=True,
              help="Go on from the unfinished run in --out-dir: only the questions it lacks are asked.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr.")
@output_options
def gsm8k_cmd(endpoint, engine, reference, lm_eval_results, lm_eval_samples, model, concurrency,
              timeout, retries, backoff, precision, device, batch_size, data, fewshot_data, limit,
              num_fewshot, max_new_tokens, score, min_accuracy, baseline, tolerance_stderr,
              baseline_samples, alpha, min_agreement, out_dir, resume, progress, fmt, out, force, filter_):
    """GSM8K accuracy gate, scored exactly as lm-eval's gsm8k task.

    Exactly one source of answers: --endpoint, --engine, --reference or
    --lm-eval-results. Prints the summary (table, markdown), the summary
    and per-question rows (json) or the rows (csv); --filter keeps the rows
    whose "doc_id question" matches. Every input is checked before any
    generation. Exit 0 pass, 1 fail, 2 bad input.
    """
    from parity.cli._options import compile_filter
    from parity.gate import clients
    from parity.gate.outdir import OutDir
    from parity.gate.run import GateConfig, gate_lm_eval, load_samples, run_gate, write_outputs
    from parity.gate.task import load_task
    from parity.report.tables import check_out

    given = [name for name, v in (("--endpoint", endpoint), ("--engine", engine),
                                  ("--reference", reference), ("--lm-eval-results", lm_eval_results))
             if v is not None]
    if len(given) != 1:
        raise ParityError("give exactly one source of answers: --endpoint URL, --engine CKPT, "
                          "--reference CKPT or --lm-eval-results FILE"
                          + (f" (got {', '.join(given)})" if given else ""))
    if lm_eval_results is not None:
        ctx = click.get_current_context()
        src = click.core.ParameterSource.COMMANDLINE
        fixed = [f"--{n.replace('_', '-')}" for n in ("data", "fewshot_data", "limit", "num_fewshot",
                                                      "max_new_tokens")
                 if ctx.get_parameter_source(n) == src]
        if fixed:
            raise ParityError(f"{', '.join(fixed)} do not apply to --lm-eval-results: "
                              "lm-eval already chose the questions and prompts")
    if lm_eval_samples is not None and lm_eval_results is None:
        raise ParityError("--lm-eval-samples goes with --lm-eval-results")
    if model is not None and endpoint is None:
        raise ParityError("--model applies to --endpoint only")
    if max_new_tokens < 1:
        raise ParityError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if resume and out_dir is None:
        raise ParityError("--resume goes on from a run in --out-dir: give --out-dir DIR")
    if resume and lm_eval_results is not None:
        raise ParityError("--resume applies to runs that generate, not to --lm-eval-results")
    config = GateConfig(score=score, min_accuracy=min_accuracy, baseline=baseline,
                        tolerance_stderr=tolerance_stderr, baseline_samples=baseline_samples,
                        min_agreement=min_agreement, alpha=alpha)
    config.validate()
    rx = compile_filter(filter_)

    # Every input, read or checked before any question is asked: a bad one
    # costs seconds, not the whole run.
    inputs = [p for p in (lm_eval_results, lm_eval_samples, baseline_samples, data, fewshot_data) if p]
    check_out(out, force=force, protect=inputs)
    base = load_samples(baseline_samples) if baseline_samples is not None else None
    outdir = None
    if out_dir is not None:
        outdir = OutDir(out_dir, resume=resume, force=force)
    if lm_eval_results is not None:
        run = clients.load_lm_eval(lm_eval_results, lm_eval_samples)
        if outdir is not None:
            outdir.check(protect=inputs)
        result = gate_lm_eval(run, config, baseline=base)
    else:
        task = load_task(data, fewshot_data, num_fewshot=num_fewshot, limit=limit)
        if endpoint is not None:
            source = clients.EndpointSource(endpoint, model, concurrency=concurrency, timeout=timeout,
                                            retries=retries, backoff=backoff)
        elif engine is not None:
            source = clients.EngineSource(engine, precision, batch_size=batch_size, device=device)
        else:
            source = clients.ReferenceSource(reference, precision, device)
        if outdir is not None:
            outdir.check(protect=inputs)
        result = run_gate(source, task, config, progress=progress, max_new_tokens=max_new_tokens,
                          out=outdir, baseline=base)

    if out_dir is not None:
        write_outputs(result, out_dir)
    write_result(result, fmt, out, force, rx, filter_, protect=inputs)
    raise SystemExit(0 if result.passed else 1)


def write_result(result, fmt, out, force, rx, pattern, protect) -> None:
    from parity.cli._options import filter_matched_nothing
    from parity.gate.outdir import jsonable
    from parity.report.tables import interactive, render, to_markdown, write_output

    rows = result.records.drop(columns=["prompt_token_ids"], errors="ignore")
    if rx is not None:
        rows = rows[[bool(rx.search(f"{r.doc_id} {r.question}")) for r in rows.itertuples()]]
        if rows.empty:
            raise filter_matched_nothing(pattern, "question")
    if fmt == "json":
        import json

        rendered = json.dumps(jsonable({**result.summary(), "rows": rows.to_dict(orient="records")}),
                              indent=1)
    elif fmt == "csv":
        rendered = render(rows, "csv")
    else:
        rendered = result.markdown()
        if rx is not None:
            cols = ["doc_id", "target", "answer_strict", "answer_flexible", "correct_strict",
                    "correct_flexible", "question"]
            shown = rows[cols]
            rendered += "\n\n" + (to_markdown(shown) if fmt == "markdown" else
                                    render(shown, "table", cut=interactive(out)))
    write_output(rendered, out, force=force, protect=protect)


@gate.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--score", "score", type=click.Choice(_FILTER_NAMES), default="strict-match",
              show_default=True, help="Which filter's answers to compare.")
@click.option("--text", is_flag=True,
              help="Also list questions with the same answer but a different generation.")
@output_options
def diff_cmd(a, b, score, text, fmt, out, force, filter_):
    """Questions whose correctness or extracted answer differs between two
    gate runs (out dirs, samples.jsonl, or lm-eval samples jsonl).
    Exit 1 when any question is listed."""
    from parity.cli._options import compile_filter
    from parity.gate.run import diff_samples, load_samples
    from parity.report.tables import check_out, interactive, render, write_output

    check_out(out, force=force, protect=(a, b))
    df, counts = diff_samples(load_samples(a), load_samples(b), score, text=text)
    rx = compile_filter(filter_)
    if rx is not None:
        df = df[[bool(rx.search(f"{r.doc_id} {r.change} {r.question}")) for r in df.itertuples()]]
    if len(df) == 0 and fmt == "table":
        rendered = "no question differs\n" + "\n".join(f"{k}: {v}" for k, v in counts.items())
    else:
        rendered = render(df, fmt, summary=counts, cut=interactive(out))
    write_output(rendered, out, force=force, protect=(a, b))
    raise SystemExit(1 if counts["differing questions"] else 0)
