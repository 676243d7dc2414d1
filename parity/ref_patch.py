"""Instrument a reference implementation you must not edit.

Every helper here is a context manager that restores exactly what it
replaced on exit, also when the body raises, and they nest in any order that
a ``with`` statement allows.

    with module_paths(model), tap_method(Indexer, "forward", stage="topk"):
        model(input_ids)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect

import torch

from parity.capture.taps import tap

_MISSING = object()
PATH_ATTR = "_parity_path"


@contextlib.contextmanager
def _swap(owner, name: str, new):
    """Set ``owner.name = new``; on exit put back what ``owner`` itself held
    (or remove the override, so an inherited attribute shows through again)."""
    saved = vars(owner).get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
    if not hasattr(owner, name):
        raise AttributeError(f"{owner!r} has no attribute {name!r} to patch")
    setattr(owner, name, new)
    try:
        yield new
    finally:
        if saved is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, saved)


@contextlib.contextmanager
def patch_method(obj_or_cls, name: str, wrapper):
    """Route calls of ``obj_or_cls.name`` through ``wrapper(original, *args, **kwargs)``.

    On a class, ``original`` is the plain function and ``args[0]`` is self;
    on an instance, ``original`` is the bound method."""
    if isinstance(obj_or_cls, type):
        raw = inspect.getattr_static(obj_or_cls, name)
        if isinstance(raw, (staticmethod, classmethod)):
            raise TypeError(f"{obj_or_cls.__name__}.{name} is a {type(raw).__name__}; patch it with patch_function")
    original = getattr(obj_or_cls, name)

    @functools.wraps(original)
    def patched(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    with _swap(obj_or_cls, name, patched):
        yield patched


@contextlib.contextmanager
def patch_function(module, name: str, replacement):
    """Replace ``module.name`` (a module object or its import path), e.g. a
    GPU-only kernel by a torch fallback."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    with _swap(module, name, replacement):
        yield replacement


@contextlib.contextmanager
def module_paths(model: torch.nn.Module, prefix: str = ""):
    """Tell every sub-module its path in ``model`` (as ``_parity_path``), so
    taps inside methods can be named by where they happen."""
    touched = []
    for path, mod in model.named_modules():
        full = f"{prefix}.{path}".strip(".") if prefix else path
        had = mod.__dict__.get(PATH_ATTR, _MISSING)
        touched.append((mod, had))
        object.__setattr__(mod, PATH_ATTR, full or type(mod).__name__)
    try:
        yield model
    finally:
        for mod, had in touched:
            if had is _MISSING:
                mod.__dict__.pop(PATH_ATTR, None)
            else:
                object.__setattr__(mod, PATH_ATTR, had)


def path_of(obj) -> str:
    return getattr(obj, PATH_ATTR, None) or type(obj).__name__


@contextlib.contextmanager
def tap_method(cls: type, name: str, stage: str | None = None, select=None):
    """Record what ``cls.name`` returns, as the tap ``{module path}.{stage}``.

    ``select(result)`` picks the tensor(s) to record from the return value:
    a tensor, or a dict of suffix -> tensor. Default: the whole result."""
    stage = stage or name

    def wrapper(original, self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        try:
            picked = select(result) if select is not None else result
            base = f"{path_of(self)}.{stage}"
            if isinstance(picked, dict):
                for suffix, t in picked.items():
                    if t is not None:
                        tap(f"{base}.{suffix}", t)
            elif isinstance(picked, (tuple, list)):
                for i, t in enumerate(picked):
                    if isinstance(t, torch.Tensor):
                        tap(f"{base}.{i}", t)
            elif picked is not None:
                tap(base, picked)
        except Exception:  # noqa: BLE001 - a tap must never change the reference's behaviour
            pass
        return result

    with patch_method(cls, name, wrapper) as p:
        yield p


@contextlib.contextmanager
def patch_module_dump(model_or_cls, config=None, *, dump_dir: str | None = None, run_info=None, **overrides):
    """Capture sub-modules of a model that never calls parity itself.

    With a model: hooks as ``parity.capture.install`` would register them.
    With a class: every instance's ``forward`` output is recorded (as
    ``{module path}:output``) for as long as the block runs.
    ``dump_dir`` and keyword overrides (classes=..., layers=...) adjust the
    config read from the environment."""
    from parity import capture
    from parity.capture.flatten import flatten
    from parity.capture.session import layer_from_path
    from parity.capture.taps import state
    from parity.config import CaptureConfig

    cfg = config or CaptureConfig.from_env()
    if dump_dir is not None:
        overrides["dump_dir"] = dump_dir
    if overrides:
        cfg = cfg.replace(**overrides)
    if isinstance(model_or_cls, torch.nn.Module):
        handle = capture.install(model_or_cls, cfg, run_info=run_info)
        try:
            yield handle
        finally:
            handle.close()
        return

    # A class: one session for the block, recording forward outputs.
    handle = capture.install(torch.nn.Module(), cfg, run_info=run_info)
    counters: dict[int, int] = {}

    def wrapper(original, self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        s = state.session
        if s is not None and s.active:
            try:
                path = path_of(self)
                call = counters.get(id(self), 0)
                counters[id(self)] = call + 1
                if cfg.calls is None or call in cfg.calls:
                    for st, t in flatten("output", out):
                        s.record(path, st, type(self).__name__, layer_from_path(path), call, t)
            except Exception as exc:  # noqa: BLE001
                s.fail(exc, f"recording {type(self).__name__}")
        return out

    try:
        with patch_method(model_or_cls, "forward", wrapper):
            yield handle
    finally:
        handle.close()
