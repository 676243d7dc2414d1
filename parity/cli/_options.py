"""Options shared by the commands, and the checks every dump-reading command
makes on its inputs before any work: each dump opens (run.json and folders
validated), an incomplete one is named, and --out / --plot may not land on
an existing file or inside an input."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import click

from parity.errors import ParityError
from parity.report.tables import FORMATS, check_out


def output_options(fn):
    """--format, --out, --force and --filter, in that order in --help."""
    fn = click.option("--filter", "filter_", metavar="PATTERN", default=None,
                      help="Keep rows whose key matches this regular expression (one that matches "
                           "nothing is an error).")(fn)
    fn = click.option("--force", is_flag=True,
                      help="Let --out replace an existing file (never one inside an input).")(fn)
    fn = click.option("--out", metavar="FILE", default=None,
                      help="Write the result to FILE (every row) instead of the terminal; an existing "
                           "FILE is refused without --force.")(fn)
    fn = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                      help="Output format.")(fn)
    return fn


def input_options(fn):
    """--allow-incomplete and --no-verify, for commands that read dumps."""
    fn = click.option("--no-verify", "no_verify", is_flag=True,
                      help="Do not check tensors against their manifest hashes (faster on large dumps; "
                           "a corrupt shard may then go unnoticed).")(fn)
    fn = click.option("--allow-incomplete", is_flag=True,
                      help="Judge an incomplete dump (a run that did not close cleanly) as far as it "
                           "goes instead of failing for it; reference records missing from the target "
                           "still fail unless --filter leaves them out.")(fn)
    return fn


def compile_filter(pattern: str | None):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ParityError(f"--filter {pattern!r} is not a valid regular expression: {exc}") from None


@dataclass
class Inputs:
    """The dumps a command reads, opened once, by role ("reference", "target",
    "solo 2", ...); the library takes these Dump objects instead of paths."""

    dumps: dict = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)   # everything read: outputs may not land inside
    allow_incomplete: bool = False

    def __getitem__(self, role: str):
        return self.dumps[role]

    def get(self, role: str):
        return self.dumps.get(role)

    def incomplete(self) -> dict[str, str]:
        """role -> why, for every incomplete input (each reason names its file)."""
        return {role: "; ".join(d.incomplete) for role, d in self.dumps.items() if d.incomplete}

    def warn(self) -> None:
        for role, why in self.incomplete().items():
            click.echo(f"warning: the {role} dump is incomplete: {why}", err=True)

    def summary(self) -> dict:
        """Summary lines naming incomplete inputs (empty when all are whole)."""
        bad = self.incomplete()
        if not bad:
            return {}
        verdict = ("judged as far as it goes (--allow-incomplete)" if self.allow_incomplete
                   else "agreement cannot be claimed (exit 1; --allow-incomplete judges it as far as it goes)")
        return {"incomplete": "; ".join(f"{role} {why}" for role, why in bad.items()) + f": {verdict}"}

    def exit_code(self, code: int) -> int:
        """An incomplete input never passes unless the user accepts it."""
        if code == 0 and self.incomplete() and not self.allow_incomplete:
            return 1
        return code


def open_inputs(roles: dict, *, verify: bool = True, allow_incomplete: bool = False, out: str | None = None,
                force: bool = False, plot_dir: str | None = None, extra_paths=(), warn: bool = True) -> Inputs:
    """Open every dump named in ``roles`` (role -> path, or None), say which
    are incomplete (unless ``warn`` is off: the command reports it itself),
    and refuse --out / --plot destinations before any work."""
    from parity.store import open_dump

    inputs = Inputs(allow_incomplete=allow_incomplete)
    for role, path in roles.items():
        if path is None:
            continue
        inputs.dumps[role] = open_dump(path, verify=verify)
        inputs.paths.append(str(path))
    inputs.paths += [str(p) for p in extra_paths if p]
    check_out(out, force=force, protect=inputs.paths)
    if plot_dir is not None:
        check_plot_dir(plot_dir, inputs.paths)
    if warn:
        inputs.warn()
    return inputs


def check_plot_dir(plot_dir: str, protect) -> None:
    from parity.report.tables import inside

    for p in protect:
        if inside(plot_dir, p):
            raise ParityError(f"--plot {plot_dir} is inside the input {p}: parity never writes into what it "
                              "reads; choose a folder outside it")


def filter_matched_nothing(pattern: str, what: str) -> ParityError:
    """The one message for a --filter that leaves nothing to show."""
    return ParityError(f"--filter {pattern!r} matches no {what}")
