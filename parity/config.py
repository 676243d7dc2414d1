"""Every PARITY_* environment variable, parsed in one place.

Capture is off unless PARITY_DUMP_DIR (tensors) or PARITY_WEIGHT_DUMP_DIR
(weights) is set. docs/environment.md documents each variable; `parity env`
prints what this module parses from the current environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from parity.errors import ConfigError

MODES = ("full", "stats", "sample")
STAGE_GROUPS = ("inputs", "outputs", "taps")
EXISTING = ("error", "overwrite", "new")


def parse_int_set(text: str | None, what: str) -> frozenset[int] | None:
    """'0-3,10' -> {0,1,2,3,10}; '' / None / 'all' -> None (no filter)."""
    if text is None or text.strip() in ("", "all", "*"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-"):
            raise ConfigError(f"{what}={text!r}: indices cannot be negative ('all' selects every one)")
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ConfigError(f"{what}={text!r}: expected integers and ranges like '0-3,10'") from None
    if not out:
        raise ConfigError(f"{what}={text!r} selects nothing; expected integers and ranges like '0-3,10', or 'all'")
    return frozenset(out)


def parse_bytes(text: str | None, what: str) -> int | None:
    """'512M', '2G', '1000' -> bytes; '' / None -> None (no budget)."""
    if text is None or text.strip() == "":
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise ConfigError(f"{what}={text!r}: expected a size like 500M or 2G")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _bool(text: str | None, what: str) -> bool:
    if text is None or text.strip() == "":
        return False
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what}={text!r}: expected 1/0, true/false, yes/no")


def _regex(text: str | None, what: str):
    if text is None or text.strip() == "":
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise ConfigError(f"{what}={text!r} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class CaptureConfig:
    dump_dir: str | None = None
    classes: frozenset[str] | None = None
    modules: re.Pattern | None = None
    layers: frozenset[int] | None = None
    calls: frozenset[int] | None = frozenset({0})
    stages: frozenset[str] = frozenset({"outputs", "taps"})
    mode: str = "full"
    sample_tokens: int = 4
    max_bytes: int | None = None
    layer_attr: str | None = None
    if_exists: str = "error"
    queue_size: int = 64
    weight_dump_dir: str | None = None
    weight_layers: frozenset[int] | None = None
    weight_exit: bool = False
    rank: int = 0
    world_size: int = 1
    # Where the settings came from, for `parity env` and run.json.
    source: dict = field(default_factory=dict, compare=False)

    @property
    def enabled(self) -> bool:
        return self.dump_dir is not None

    @property
    def any_enabled(self) -> bool:
        return self.dump_dir is not None or self.weight_dump_dir is not None

    def replace(self, **changes) -> "CaptureConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict | None = None) -> "CaptureConfig":
        env = os.environ if env is None else env
        g = lambda k: env.get(k)  # noqa: E731
        src = {k: v for k, v in env.items() if k.startswith("PARITY_") and not k.startswith("PARITY_ENGINE")}

        classes = g("PARITY_DUMP_CLASSES")
        if classes is not None and classes.strip():
            names = frozenset(c.strip() for c in classes.split(",") if c.strip())
            if not names:
                raise ConfigError(f"PARITY_DUMP_CLASSES={classes!r} names no class")
            classes = names
        else:
            classes = None

        calls_text = g("PARITY_DUMP_CALLS")
        calls = frozenset({0}) if calls_text is None else parse_int_set(calls_text, "PARITY_DUMP_CALLS")

        stages_text = g("PARITY_DUMP_STAGES")
        if stages_text:
            stages = frozenset(s.strip() for s in stages_text.split(",") if s.strip())
            bad = stages - set(STAGE_GROUPS)
            if bad:
                raise ConfigError(f"PARITY_DUMP_STAGES: unknown {sorted(bad)}; use {', '.join(STAGE_GROUPS)}")
        else:
            stages = frozenset({"outputs", "taps"})

        mode_text = (g("PARITY_DUMP_MODE") or "full").strip()
        mode, _, n = mode_text.partition(":")
        if mode not in MODES:
            raise ConfigError(f"PARITY_DUMP_MODE={mode_text!r}: use one of {', '.join(MODES)} (sample:N for N tokens)")
        sample_tokens = 4
        if n:
            if not n.isdigit() or int(n) < 1:
                raise ConfigError(f"PARITY_DUMP_MODE={mode_text!r}: N in sample:N must be a positive integer")
            sample_tokens = int(n)

        if_exists = (g("PARITY_DUMP_EXISTING") or "error").strip()
        if _bool(g("PARITY_DUMP_OVERWRITE"), "PARITY_DUMP_OVERWRITE"):
            if_exists = "overwrite"
        if if_exists not in EXISTING:
            raise ConfigError(f"PARITY_DUMP_EXISTING={if_exists!r}: use one of {', '.join(EXISTING)}")

        queue = g("PARITY_DUMP_QUEUE") or "64"
        if not queue.isdigit() or int(queue) < 1:
            raise ConfigError(f"PARITY_DUMP_QUEUE={queue!r}: expected a positive integer")

        rank = env.get("PARITY_RANK", env.get("RANK", "0"))
        world = env.get("PARITY_WORLD_SIZE", env.get("WORLD_SIZE", "1"))
        if not rank.isdigit() or not world.isdigit() or int(world) < 1 or int(rank) >= int(world):
            raise ConfigError(f"rank {rank!r} / world size {world!r} are not valid")

        return cls(
            dump_dir=g("PARITY_DUMP_DIR") or None,
            classes=classes,
            modules=_regex(g("PARITY_DUMP_MODULES"), "PARITY_DUMP_MODULES"),
            layers=parse_int_set(g("PARITY_DUMP_LAYERS"), "PARITY_DUMP_LAYERS"),
            calls=calls,
            stages=stages,
            mode=mode,
            sample_tokens=sample_tokens,
            max_bytes=parse_bytes(g("PARITY_DUMP_MAX_BYTES"), "PARITY_DUMP_MAX_BYTES"),
            layer_attr=g("PARITY_DUMP_LAYER_ATTR") or None,
            if_exists=if_exists,
            queue_size=int(queue),
            weight_dump_dir=g("PARITY_WEIGHT_DUMP_DIR") or None,
            weight_layers=parse_int_set(g("PARITY_WEIGHT_DUMP_LAYERS"), "PARITY_WEIGHT_DUMP_LAYERS"),
            weight_exit=_bool(g("PARITY_WEIGHT_DUMP_EXIT"), "PARITY_WEIGHT_DUMP_EXIT"),
            rank=int(rank),
            world_size=int(world),
            source=src,
        )

    def describe(self) -> dict:
        """JSON-friendly view, for run.json and `parity env`."""
        def show(v):
            if isinstance(v, frozenset):
                return sorted(v)
            if isinstance(v, re.Pattern):
                return v.pattern
            return v
        return {f.name: show(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "source"}


# name, meaning: the table `parity env` prints and docs/environment.md mirrors.
VARIABLES = [
    ("PARITY_DUMP_DIR", "Turns tensor capture on; dumps go here (run.json + rank{R}/)."),
    ("PARITY_DUMP_EXISTING", "What to do if PARITY_DUMP_DIR already holds a run: error (default), overwrite, new (fresh run-NNN subfolder)."),
    ("PARITY_DUMP_OVERWRITE", "1 = same as PARITY_DUMP_EXISTING=overwrite."),
    ("PARITY_DUMP_CLASSES", "Comma-separated module class names to capture (default: every module)."),
    ("PARITY_DUMP_MODULES", "Regular expression searched in the module path (default: every module)."),
    ("PARITY_DUMP_LAYERS", "Layer indices, e.g. 0-3,10 (default: all). Modules outside any layer always pass."),
    ("PARITY_DUMP_LAYER_ATTR", "Module attribute holding the layer index (default: parsed from '.layers.N.' in the path)."),
    ("PARITY_DUMP_CALLS", "Call indices per module and step: 0 (default), all, 2-5."),
    ("PARITY_DUMP_STAGES", "Comma-separated: inputs, outputs, taps (default outputs,taps)."),
    ("PARITY_DUMP_MODE", "full (tensors), stats (summaries only, no tensor bytes), sample[:N] (first/last N tokens)."),
    ("PARITY_DUMP_MAX_BYTES", "Budget of tensor bytes, e.g. 2G; beyond it capture stops with one message."),
    ("PARITY_DUMP_QUEUE", "Records held in the background writer's queue before the model waits (default 64)."),
    ("PARITY_WEIGHT_DUMP_DIR", "Dump the model's parameters and buffers here at install time."),
    ("PARITY_WEIGHT_DUMP_LAYERS", "Layer filter for the weight dump, e.g. 0-1."),
    ("PARITY_WEIGHT_DUMP_EXIT", "1 = exit the process after the weight dump."),
    ("PARITY_RANK / PARITY_WORLD_SIZE", "Rank and world size (default: RANK / WORLD_SIZE, else 0 / 1)."),
]
