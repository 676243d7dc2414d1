"""`parity ref-vs-target`, `layer-bisect`, `summary-diff`, `slot-invariance`, `weights`, `topk`.

Each parses options, opens its input dumps (open_inputs: incomplete ones
are named, outputs checked), calls one library function and renders what it
returns. Exit 0: agreement; 1: divergence found, or agreement cannot be
claimed (reference records missing from the target, an incomplete input);
2: bad input.
"""

from __future__ import annotations

import click

from parity.cli import cli
from parity.cli._options import compile_filter, filter_matched_nothing, input_options, open_inputs, output_options
from parity.errors import ParityError
from parity.report.tables import interactive, render, write_output

_TABLE_COLS = ["key", "phase", "step", "seq", "rank", "shape", "rel_l2", "cos", "max_abs", "frac_equal",
               "verdict", "reason"]


def _preset_help(what: str) -> str:
    from parity.compare.mapping import presets

    return f"{what} One of: {', '.join(presets())}."


def _sided(fn):
    """--map-ref / --map-target folded into the mapping the command passes
    on (as a Mapping; without them, --map / --preset pass through as given)."""
    import functools

    @functools.wraps(fn)
    def run(*args, map_ref=None, map_target=None, **kw):
        if map_ref or map_target:
            from parity.compare.align import resolve_mapping
            from parity.store.reader import open_dump

            dumps = () if kw.get("map_file") or kw.get("preset") else (
                open_dump(kw["ref"], verify=False), open_dump(kw["target"], verify=False))
            kw["map_file"] = resolve_mapping(kw.get("map_file"), kw.get("preset"), map_ref=map_ref,
                                             map_target=map_target, dumps=dumps)
            kw["preset"] = None
        return fn(*args, **kw)

    return run


def _pair_options(fn):
    fn = _sided(fn)
    fn = click.option("--map-target", metavar="FILE", default=None,
                      help="Rules for the target's keys only, applied before the shared ones.")(fn)
    fn = click.option("--map-ref", metavar="FILE", default=None,
                      help="Rules for the reference's keys only, applied before the shared ones.")(fn)
    fn = click.option("--preset", metavar="NAME", default=None,
                      help=_preset_help("Mapping preset for the canonical keys (default: the one the runs "
                                        "declare in run.json, else none)."))(fn)
    fn = click.option("--map", "map_file", metavar="FILE", default=None,
                      help="Mapping rules file (.yaml/.toml) that rewrites keys to canonical keys: 'rules' for "
                           "both dumps, 'ref' and 'target' sections for one each.")(fn)
    fn = click.option("--target", "target", metavar="DIR", required=True, help="Target (engine) dump.")(fn)
    fn = click.option("--ref", "ref", metavar="DIR", required=True, help="Reference dump.")(fn)
    return fn


def _plot_option(fn):
    return click.option("--plot", "plot_dir", metavar="DIR", default=None,
                        help="Also write PNG plots into DIR.")(fn)


def _floor_options(fn):
    fn = click.option("--atol", type=float, default=None,
                      help="Noise floor: absolute slack (default: unit roundoff of the dtype).")(fn)
    fn = click.option("--m", "m", type=float, default=None,
                      help="Noise floor: allowed multiple of the reference's own error (default per dtype).")(fn)
    fn = click.option("--floor", "floor", metavar="DIR", default=None,
                      help="The reference run at higher precision: a row fails when "
                           "err(target, floor) > m * err(ref, floor) + atol.")(fn)
    fn = click.option("--noise", "noise", metavar="DIR", multiple=True,
                      help="A member of a noise ensemble (a perturbed reference run, e.g. side_by_side "
                           "--noise K); repeat it. Each row is judged against its record's envelope: fail "
                           "beyond 2x it (docs/calibration.md). Takes precedence over --floor.")(fn)
    return fn


def _notes(notes):
    for n in notes:
        click.echo(f"note: {n}", err=True)


def _only(df, limit=5) -> str:
    keys = list(dict.fromkeys(df["key"]))
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(df)} piece(s) of {len(keys)} record(s): " + ", ".join(keys[:limit]) + more


def _only_keys(keys: list[str], limit: int = 5) -> str:
    """'N: a, b, ...' for records that found no partner (names listed once)."""
    return f"{len(keys)}: " + ", ".join(list(dict.fromkeys(keys))[:limit])


def _pair_inputs(ref, target, *, floor=None, noise=(), no_verify=False, allow_incomplete=False, out=None,
                 force=False, plot_dir=None):
    roles = {"reference": ref, "target": target, "floor": floor,
             **{f"noise member {i + 1}": n for i, n in enumerate(noise)}}
    return open_inputs(roles, verify=not no_verify, allow_incomplete=allow_incomplete, out=out, force=force,
                       plot_dir=plot_dir)


def _write(text, out, force, inputs) -> None:
    write_output(text, out, force=force, protect=inputs.paths)


def _compare_view(res, fmt):
    t = res.table
    if fmt != "table":
        return t
    cols = [c for c in _TABLE_COLS if c in t and (c != "rank" or t["rank"].map(lambda v: v is not None).any())]
    t = t[cols].copy()
    # The full reason is in csv/json and the summary; on a terminal it must
    # not push the verdict off the right edge.
    t["reason"] = t["reason"].map(lambda r: r if len(r) <= 40 else r[:39] + "~")
    return t


def _compare_summary(res) -> dict:
    s = res.summary()
    if len(res.only_ref):
        s["only_in_reference"] = _only(res.only_ref)
    if len(res.only_target):
        s["only_in_target"] = _only(res.only_target)
    if res.decisions is not None and len(res.decisions.table):
        d = res.decisions.table
        flipped = d[d["frac_tokens_differ"] > 0]
        s["decisions"] = (f"{len(flipped)} of {len(d)} (layer, decision) pairs differ"
                          + (f"; first at layer {flipped.iloc[0]['layer']} {flipped.iloc[0]['decision']}"
                             if len(flipped) else ""))
    if "noise_env" in res.table:
        s["mode"] = "noise model"
    elif res.floor:
        s["mode"] = "noise floor"
    return s


@cli.command("ref-vs-target")
@_pair_options
@_floor_options
@output_options
@input_options
@_plot_option
def ref_vs_target(ref, target, map_file, preset, floor, noise, m, atol, fmt, out, force, filter_, allow_incomplete,
                  no_verify, plot_dir):
    """Compare every aligned pair of records of two dumps, in execution order.

    Records meet on (canonical key, phase, step, call, sequence); ragged
    [T, ...] and batched [B, S, ...] layouts are cut per sequence first.
    Exit 1 when any pair fails.
    """
    from parity.compare.api import compare_dumps

    io = _pair_inputs(ref, target, floor=floor, noise=noise, no_verify=no_verify, allow_incomplete=allow_incomplete,
                      out=out, force=force, plot_dir=plot_dir)
    res = compare_dumps(io["reference"], io["target"], mapping=map_file, preset=preset, floor=io.get("floor"),
                        filter=compile_filter(filter_), m=m, atol=atol, noise=list(noise) or None)
    summary = {**_compare_summary(res), **io.summary()}
    _write(render(_compare_view(res, fmt), fmt, keep=res.worst(), summary=summary, cut=interactive(out)),
           out, force, io)
    _notes(res.notes)
    if plot_dir:
        from parity.report.plots import compare_plots

        _notes([f"plots: {', '.join(compare_plots(res.table, None, plot_dir))}"])
    raise SystemExit(io.exit_code(res.exit_code))


@cli.command("layer-bisect")
@_pair_options
@_floor_options
@output_options
@input_options
@_plot_option
def layer_bisect_cmd(ref, target, map_file, preset, floor, noise, m, atol, fmt, out, force, filter_,
                     allow_incomplete, no_verify, plot_dir):
    """Find the first layer where an error enters, and the stage inside it.

    Prints the per-layer error curve (err L / err L-1, so amplification
    shows) and, for the entry layer, every stage's input and output error.
    Exit 1 when a divergence is found.
    """
    from parity.bisect import layer_bisect

    io = _pair_inputs(ref, target, floor=floor, noise=noise, no_verify=no_verify, allow_incomplete=allow_incomplete,
                      out=out, force=force, plot_dir=plot_dir)
    res = layer_bisect(io["reference"], io["target"], mapping=map_file, preset=preset, floor=io.get("floor"),
                       filter=compile_filter(filter_), m=m, atol=atol, noise=list(noise) or None)
    summary = {"result": res.message}
    if res.compare is not None and res.compare.missing:
        summary["missing_in_target"] = res.compare.summary()["missing_in_target"]
    summary.update(io.summary())
    if res.layer is not None:
        summary.update(layer=res.layer, stage=res.stage, key=res.key)
    if res.entries[1:]:
        summary["also_enters_at"] = ", ".join(map(str, res.entries[1:]))
    if fmt == "json":
        summary["stages"] = res.stages.to_dict(orient="records")
        text = render(res.curve, fmt, summary=summary)
    else:
        keep = [i for i, e in enumerate(res.curve["enters"]) if e]
        text = render(res.curve, fmt, keep=keep, summary=None if fmt == "csv" else summary, cut=interactive(out))
        if len(res.stages) and fmt != "csv":
            cols = res.stages.columns if fmt != "table" else [c for c in res.stages.columns if c not in ("key",)]
            text += f"\n\nstages of layer {res.layer}:\n" + render(res.stages[cols], fmt, cut=interactive(out))
    _write(text, out, force, io)
    _notes(res.compare.notes if res.compare else [])
    if plot_dir:
        from parity.report.plots import compare_plots

        _notes([f"plots: {', '.join(compare_plots(res.compare.table, res.curve, plot_dir))}"])
    raise SystemExit(io.exit_code(res.exit_code))


@cli.command("summary-diff")
@_pair_options
@output_options
@input_options
def summary_diff_cmd(ref, target, map_file, preset, fmt, out, force, filter_, allow_incomplete, no_verify):
    """Screen two dumps by their summaries (works on stats-mode dumps).

    For each aligned pair the relative gap of the two l2 norms is a lower
    bound on rel_l2 of the difference: a gap beyond the dtype's fail
    threshold, or NaN/Inf on one side only, proves a divergence; anything
    else is "consistent", not proven equal. Both dumps need the same batch
    layout (pairs whose element counts differ are skipped). Prints the first
    divergence. Exit 1 when any pair fails.
    """
    from parity.compare.summaries import summary_diff

    io = _pair_inputs(ref, target, no_verify=no_verify, allow_incomplete=allow_incomplete, out=out, force=force)
    res = summary_diff(io["reference"], io["target"], mapping=map_file, preset=preset, filter=compile_filter(filter_))
    t = res.table
    if fmt == "table":
        t = t[["key", "phase", "step", "seq", "dtype", "l2_ref", "l2_target", "l2_gap", "nonfinite_ref",
               "nonfinite_target", "verdict", "reason"]].copy()
        t["reason"] = t["reason"].map(lambda r: r if len(r) <= 40 else r[:39] + "~")
    summary = res.summary()
    for side, keys in (("only_in_reference", res.only_ref), ("only_in_target", res.only_target)):
        if keys:
            summary[side] = _only_keys(keys)
    summary.update(io.summary())
    _write(render(t, fmt, keep=res.worst(), summary=summary, cut=interactive(out)), out, force, io)
    _notes(res.notes)
    raise SystemExit(io.exit_code(res.exit_code))


@cli.command("slot-invariance")
@click.option("--dir", "batched", metavar="BATCHED", required=True, help="Dump of the batched run.")
@click.option("--solo", "solo", metavar="DIR", multiple=True,
              help="Dump of one prompt run alone (repeat for each); matched to its slot by token ids.")
@click.option("--same-prompt", is_flag=True, help="The batch holds copies of one prompt: compare every slot with slot 0.")
@click.option("--bitwise", "mode", flag_value="bitwise",
              help="A slot must equal its baseline bit for bit (for engines that promise batch invariance).")
@click.option("--rounding", "mode", flag_value="rounding",
              help="A slot may differ within rounding: judged as ref-vs-target judges a pair.")
@click.option("--noise-ref", metavar="DIR", default=None,
              help="Rounding mode: the reference run of a noise ensemble (with --noise).")
@click.option("--noise", "noise", metavar="DIR", multiple=True,
              help="Rounding mode: a member of a noise ensemble of --noise-ref (repeat it); each pair is judged "
                   "against its record's envelope instead of the precision's fixed limits.")
@click.option("--preset", metavar="NAME", default=None,
              help=_preset_help("Mapping preset that takes this run's keys onto the noise ensemble's."))
@click.option("--map", "map_file", metavar="FILE", default=None,
              help="Mapping rules file that takes this run's keys onto the noise ensemble's.")
@output_options
@input_options
@_plot_option
def slot_invariance_cmd(batched, solo, same_prompt, mode, noise_ref, noise, preset, map_file, fmt, out, force,
                        filter_, allow_incomplete, no_verify, plot_dir):
    """Does every slot of a batched run compute what the same prompt computes alone?

    Records are cut per sequence with cu_seqlens (unequal lengths work);
    prefill and each decode step are compared separately. By default a run
    that declares batch_invariant in run.json is judged bitwise and any
    other run by rounding: "not bitwise, within rounding" passes, a slot
    beyond rounding computes something else. Exit 1 when a slot fails.
    """
    from parity.errors import ParityError
    from parity.slots import slot_invariance

    if bool(noise) != bool(noise_ref):
        raise ParityError("a noise model needs both --noise-ref DIR and at least one --noise DIR")
    io = open_inputs({"batched": batched, **{f"solo {i + 1}": s for i, s in enumerate(solo)}, "noise reference":
                      noise_ref, **{f"noise member {i + 1}": n for i, n in enumerate(noise)}},
                     verify=not no_verify, allow_incomplete=allow_incomplete, out=out, force=force, plot_dir=plot_dir)
    rx = compile_filter(filter_)
    if rx is not None and not any(rx.search(r.key) for r in io["batched"].records()):
        raise filter_matched_nothing(filter_, f"record of {batched}")
    model = None
    if noise:
        from parity.noise import noise_model

        model = noise_model(io["noise reference"], list(noise), mapping=map_file, preset=preset)
    res = slot_invariance(io["batched"], [io[f"solo {i + 1}"] for i in range(len(solo))], same_prompt=same_prompt,
                          filter=rx, mode=mode or "auto", noise=model, mapping=map_file,
                          preset=preset)
    t = res.table
    summary = {"rule": res.judge.rule, "pairs": len(t), "bitwise_equal": int(t["invariant"].sum()),
               "not_bitwise": int((~t["invariant"]).sum())}
    for v in ("pass", "warn", "fail"):
        summary[v] = int((t["verdict"] == v).sum())
    for r in res.first.itertuples(index=False):
        where = r.phase + (f" step {r.step}" if r.phase == "decode" else "")
        summary[f"slot {r.slot} (seq {r.seq}) {where}" + (f" rank {r.rank}" if r.rank else "")] = (
            f"first fails at layer {r.layer} {r.stage}: {r.reason}")
    summary["result"] = f"{res.status}: {res.message}"
    summary.update(io.summary())
    if fmt == "json":
        summary["first"] = res.first.to_dict(orient="records")
    first_rows, seen = [], set()
    for i in (i for i, v in enumerate(t["verdict"]) if v == "fail"):
        k = (t["slot"].iat[i], t["phase"].iat[i], t["step"].iat[i])
        if k not in seen:
            seen.add(k)
            first_rows.append(i)
    keep = first_rows + [i for i, ok in enumerate(t["invariant"]) if not ok]
    view = t
    if fmt == "table":
        view = t.drop(columns=[c for c in ("rank",) if not t["rank"].astype(bool).any()])
        view = view.assign(reason=view["reason"].map(lambda r: r if len(r) <= 40 else r[:39] + "~"))
    _write(render(view, fmt, keep=keep, summary=summary, cut=interactive(out)), out, force, io)
    _notes(res.notes)
    if plot_dir:
        from parity.report.plots import slot_plots

        _notes([f"plots: {', '.join(slot_plots(t, plot_dir))}"])
    raise SystemExit(io.exit_code(res.exit_code))


@cli.command("weights")
@_pair_options
@output_options
@input_options
@_plot_option
def weights_cmd(ref, target, map_file, preset, fmt, out, force, filter_, allow_incomplete, no_verify, plot_dir):
    """Compare two weight dumps; FP8/FP4 weights are dequantized with their scales first.

    A quantized weight without its scale is compared through its raw codes,
    so a missing scale shows as a gross error. Exit 1 when any weight fails.
    """
    from parity.compare.weights import compare_weights

    io = _pair_inputs(ref, target, no_verify=no_verify, allow_incomplete=allow_incomplete, out=out, force=force,
                      plot_dir=plot_dir)
    res = compare_weights(io["reference"], io["target"], mapping=map_file, preset=preset,
                          filter=compile_filter(filter_))
    t = res.table
    summary = {"weights": len(t)}
    for s in ("pass", "warn", "fail"):
        summary[s] = int((t["verdict"] == s).sum())
    if res.only_ref:
        from parity.compare.api import missing_message

        summary["only_in_reference"] = _only_keys(res.only_ref)
        summary["missing_in_target"] = missing_message(len(res.only_ref))
    if res.only_target:
        summary["only_in_target"] = _only_keys(res.only_target)
    summary.update(io.summary())
    keep = [i for i, v in enumerate(t["verdict"]) if v != "pass"]
    _write(render(t, fmt, keep=keep, summary=summary, cut=interactive(out)), out, force, io)
    _notes(res.notes)
    if plot_dir:
        from parity.report.plots import compare_plots

        _notes([f"plots: {', '.join(compare_plots(t, None, plot_dir))}"])
    raise SystemExit(io.exit_code(res.exit_code))


@cli.command("topk")
@_pair_options
@output_options
@input_options
@_plot_option
def topk_cmd(ref, target, map_file, preset, fmt, out, force, filter_, allow_incomplete, no_verify, plot_dir):
    """Compare discrete decisions: indexer top-k sets and MoE routing.

    Per layer: mean and min set overlap, fraction of tokens whose decision
    differs, and the routing-weight error aligned by expert id. Exit 1 when
    any decision differs.
    """
    from parity.decisions import compare_decisions

    io = _pair_inputs(ref, target, no_verify=no_verify, allow_incomplete=allow_incomplete, out=out, force=force,
                      plot_dir=plot_dir)
    rx = compile_filter(filter_)
    res = compare_decisions(io["reference"], io["target"], mapping=map_file, preset=preset, filter=rx)
    t = res.table
    if rx is not None and not len(t):
        raise filter_matched_nothing(filter_, "decision tap (indexer.topk, topk_ids, topk_weights) found on "
                                              "both sides")
    missing = res.missing
    differ = t[t["frac_tokens_differ"] > 0] if len(t) else t
    summary = {"decisions": len(t), "differ": len(differ)}
    if missing:
        summary["missing_in_target"] = missing
    if len(differ):
        r = differ.iloc[0]
        summary["first"] = f"layer {r['layer']} {r['decision']}: {r['frac_tokens_differ']:.1%} of tokens"
    summary.update(io.summary())
    keep = [i for i, v in enumerate(t["frac_tokens_differ"]) if v > 0] if len(t) else []
    _write(render(t, fmt, keep=keep, summary=summary, cut=interactive(out)), out, force, io)
    _notes(res.notes)
    if plot_dir and len(t):
        import os

        from parity.report.plots import _outdir, error_curve

        c = t.groupby("layer")["frac_tokens_differ"].max().reset_index().rename(columns={"frac_tokens_differ": "err"})
        p = error_curve(c, os.path.join(_outdir(plot_dir), "decisions_by_layer.png"),
                        "fraction of tokens whose decision differs")
        _notes([f"plots: {p}"])
    raise SystemExit(io.exit_code(1 if missing else res.exit_code))


@cli.command("map")
@click.option("--ref", "ref", metavar="DIR", required=True, help="Reference dump.")
@click.option("--target", "target", metavar="DIR", required=True, help="Target dump whose names are mapped.")
@click.option("--out", metavar="FILE", default=None, help="Write the rules file to FILE instead of the terminal.")
@click.option("--force", is_flag=True, help="Let --out replace an existing file (never one inside an input).")
def map_cmd(ref, target, out, force):
    """Propose a mapping of the target's record names onto the reference's.

    Records of one layer (and those outside the layers) are paired in
    execution order by last dimension and kind; each pair whose names
    differ becomes a rule for every layer. Writes an editable rules file
    (use it with --map) and says how many target records it pairs. Exit 0.
    """
    from parity.compare.propose import check_proposal, propose_mapping

    io = open_inputs({"reference": ref, "target": target}, verify=False, allow_incomplete=True, out=out,
                     force=force)
    p = propose_mapping(io["reference"], io["target"])
    text = p.yaml(ref, target)
    paired, total = check_proposal(io["reference"], io["target"], text)
    write_output(text, out, force=force, protect=io.paths)
    click.echo(f"parity map: {len(p.rules())} rule(s); {paired} of {total} target record(s) meet a reference "
               f"record under them; {len(p.only_target)} target and {len(p.only_ref)} reference name(s) unpaired",
               err=True)
