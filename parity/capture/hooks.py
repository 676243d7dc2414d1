"""Forward hooks on the selected modules of a model."""

from __future__ import annotations

import torch

from parity.capture.flatten import flatten
from parity.capture.session import CaptureSession, layer_from_path
from parity.config import CaptureConfig


class _ModuleInfo:
    __slots__ = ("path", "cls", "layer", "count", "generation")

    def __init__(self, path: str, cls: str, layer):
        self.path, self.cls, self.layer = path, cls, layer
        self.count, self.generation = 0, -1


def module_layers(model: torch.nn.Module, attr: str | None) -> dict[str, int | None]:
    """Layer index of every module path: from ``attr`` on the module or its
    nearest ancestor when given, else parsed from ``layers.N`` in the path."""
    out: dict[str, int | None] = {}
    for path, mod in model.named_modules():
        if attr is None:
            out[path] = layer_from_path(path)
            continue
        val = getattr(mod, attr, None)
        if isinstance(val, int):
            out[path] = val
        else:
            parent = path.rpartition(".")[0] if "." in path else ""
            out[path] = out.get(parent) if path else None
    return out


def select_modules(model: torch.nn.Module, cfg: CaptureConfig, prefix: str = ""):
    """(path, module, layer) for every module the config selects."""
    layers = module_layers(model, cfg.layer_attr)
    for path, mod in model.named_modules():
        full = f"{prefix}.{path}".strip(".") if prefix else path
        if cfg.classes is not None and type(mod).__name__ not in cfg.classes:
            continue
        if cfg.modules is not None and not cfg.modules.search(full):
            continue
        layer = layers.get(path)
        if cfg.layers is not None and layer is not None and layer not in cfg.layers:
            continue
        yield full or type(mod).__name__, mod, layer


def filter_problems(model: torch.nn.Module, cfg: CaptureConfig, prefix: str = "") -> tuple[int, list[str]]:
    """How many modules of ``model`` the config selects, and each filter
    that matches nothing in it (a typo would otherwise give an empty dump
    and no word)."""
    name = type(model).__name__
    mods = list(model.named_modules())
    problems = []
    if cfg.classes is not None:
        present = {type(m).__name__ for _, m in mods}
        missing = sorted(cfg.classes - present)
        if missing:
            problems.append(f"PARITY_DUMP_CLASSES: {name} has no module of class {', '.join(missing)} "
                            f"(its classes: {_some(sorted(present))})")
    if cfg.modules is not None:
        paths = [f"{prefix}.{p}".strip(".") if prefix else p for p, _ in mods]
        if not any(cfg.modules.search(p) for p in paths):
            problems.append(f"PARITY_DUMP_MODULES={cfg.modules.pattern!r} matches no module path of {name}")
    if cfg.layers is not None:
        have = {v for v in module_layers(model, cfg.layer_attr).values() if v is not None}
        if not have & cfg.layers:
            problems.append(f"PARITY_DUMP_LAYERS={_ranges(cfg.layers)} matches no layer of {name} "
                            f"({'its layers: ' + _ranges(have) if have else 'no module of it is in a layer'})")
    selected = sum(1 for _ in select_modules(model, cfg, prefix))
    if not selected and not problems:
        problems.append(f"the capture filters together select no module of {name}")
    return selected, problems


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _ranges(values) -> str:
    """{0, 1, 2, 3, 10} -> '0-3,10'."""
    spans: list[list[int]] = []
    for v in sorted(values):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def layout_of(module: torch.nn.Module, stage: str) -> dict | None:
    """How a record of ``module`` lies across tensor-parallel ranks, as the
    module declares it in ``parity_layout`` (docs/dump-format.md): keyed by
    the stage (``output.1``) or its family (``output``, ``input``); None:
    nothing declared (replicated)."""
    layout = getattr(module, "parity_layout", None)
    if not layout:
        return None
    return layout.get(stage) or layout.get(stage.split(".", 1)[0])


def register(model: torch.nn.Module, session: CaptureSession, prefix: str = "") -> list:
    """Register hooks; return their removable handles."""
    cfg = session.config
    want_in = "inputs" in cfg.stages
    want_out = "outputs" in cfg.stages
    handles = []
    if not (want_in or want_out):
        return handles
    for path, mod, layer in select_modules(model, cfg, prefix):
        info = _ModuleInfo(path, type(mod).__name__, layer)

        def call_index(info=info, advance=True):
            if info.generation != session.generation:
                info.generation, info.count = session.generation, 0
            c = info.count
            if advance:
                info.count += 1
            return c

        if want_in:
            def pre(module, args, kwargs, info=info, call_index=call_index):
                if not session.active:
                    return None
                try:
                    call = call_index(advance=not want_out)
                    if cfg.calls is None or call in cfg.calls:
                        for stage, t in flatten("input", {**dict(enumerate(args)), **kwargs}):
                            session.record(info.path, stage, info.cls, info.layer, call, t,
                                           layout_of(module, stage))
                except Exception as exc:  # noqa: BLE001 - never break the host
                    session.fail(exc, f"recording inputs of {info.path}")
                return None
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        if want_out:
            def post(module, args, kwargs, output, info=info, call_index=call_index):
                if not session.active:
                    return None
                try:
                    call = call_index()
                    if cfg.calls is None or call in cfg.calls:
                        for stage, t in flatten("output", output):
                            session.record(info.path, stage, info.cls, info.layer, call, t,
                                           layout_of(module, stage))
                except Exception as exc:  # noqa: BLE001
                    session.fail(exc, f"recording outputs of {info.path}")
                return None
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles
