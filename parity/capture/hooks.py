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
                            session.record(info.path, stage, info.cls, info.layer, call, t)
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
                            session.record(info.path, stage, info.cls, info.layer, call, t)
                except Exception as exc:  # noqa: BLE001
                    session.fail(exc, f"recording outputs of {info.path}")
                return None
            handles.append(mod.register_forward_hook(post, with_kwargs=True))
    return handles
