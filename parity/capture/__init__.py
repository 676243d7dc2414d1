"""Env-gated capture: forward hooks, explicit taps and weight dumps.

    handle = parity.capture.install(model)   # one line after loading

With no PARITY_* variable set this registers nothing and returns a handle
whose methods do nothing.
"""

from __future__ import annotations

import sys

from parity.capture.taps import state as _state
from parity.capture.taps import tap
from parity.config import CaptureConfig
from parity.errors import ParityError

__all__ = ["install", "tap", "set_context", "set_run_info", "active", "flush", "dump_weights", "CaptureHandle"]


class CaptureHandle:
    """What ``install`` returns. Every method is safe to call when capture is off."""

    def __init__(self, session=None, hooks=None):
        self._session = session
        self._hooks = hooks or []

    @property
    def enabled(self) -> bool:
        return self._session is not None and self._session.active

    @property
    def dump_dir(self) -> str | None:
        return self._session.root if self._session is not None else None

    @property
    def hook_count(self) -> int:
        return len(self._hooks)

    @property
    def errors(self) -> int:
        return self._session.errors if self._session is not None else 0

    def set_context(self, phase=None, step=None, **meta) -> None:
        if self._session is not None and self._session.active:
            self._session.set_context(phase=phase, step=step, **meta)

    def set_run_info(self, **info) -> None:
        if self._session is not None and self._session.active:
            self._session.set_run_info(**info)

    def flush(self) -> None:
        if self._session is not None:
            self._session.flush()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        s, self._session = self._session, None
        if s is not None:
            s.users -= 1
            if s.users <= 0:
                s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def install(model, config: CaptureConfig | None = None, run_info: dict | None = None,
            prefix: str = "") -> CaptureHandle:
    """Register capture on ``model`` as the config (default: PARITY_* env)
    asks. Never raises: a bad setting is reported on stderr and capture stays off."""
    try:
        cfg = CaptureConfig.from_env() if config is None else config
    except ParityError as exc:
        print(f"parity: capture disabled: {exc}", file=sys.stderr)
        return CaptureHandle()
    if not cfg.any_enabled:
        return CaptureHandle()

    from parity.capture import hooks
    from parity.capture.session import CaptureSession
    from parity.capture.weights import dump_weights as _dump_weights

    if cfg.weight_dump_dir:
        try:
            n = _dump_weights(model, cfg.weight_dump_dir, layers=cfg.weight_layers, if_exists=cfg.if_exists,
                              rank=cfg.rank, world_size=cfg.world_size, run_info=run_info)
            print(f"parity: dumped {n} weights to {cfg.weight_dump_dir}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - capture never breaks the host
            print(f"parity: weight dump failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if cfg.weight_exit:
            sys.exit(0)
    if not cfg.enabled:
        return CaptureHandle()

    info = {"model": type(model).__name__, **(run_info or {})}
    try:
        if not _filters_match(model, cfg, prefix):
            return CaptureHandle()
        p = next(model.parameters(), None)
        if p is not None:
            info.setdefault("device", str(p.device))
            info.setdefault("param_dtype", str(p.dtype).removeprefix("torch."))
        session = _state.session
        if session is None or not session.active:
            session = CaptureSession(cfg, info)
            _state.session = session
        session.users += 1
        handle = CaptureHandle(session, hooks.register(model, session, prefix))
    except Exception as exc:  # noqa: BLE001
        print(f"parity: capture disabled: {type(exc).__name__}: {exc}", file=sys.stderr)
        return CaptureHandle()
    return handle


def _filters_match(model, cfg: CaptureConfig, prefix: str) -> bool:
    """Say in one line what in the filters matches nothing in ``model``;
    False when nothing at all could be captured (no module, no taps)."""
    from parity.capture import hooks

    if not cfg.stages & {"inputs", "outputs"}:
        return True
    selected, problems = hooks.filter_problems(model, cfg, prefix)
    if not problems:
        return True
    if not selected and "taps" not in cfg.stages:
        print(f"parity: capture disabled: {'; '.join(problems)}", file=sys.stderr)
        return False
    then = "only taps are captured" if not selected else "capture goes on with the modules that match"
    print(f"parity: {'; '.join(problems)}; {then}", file=sys.stderr)
    return True


def active() -> bool:
    return _state.session is not None


def set_context(phase=None, step=None, **meta) -> None:
    """Set phase, step and layout metadata for the following records."""
    s = _state.session
    if s is not None:
        s.set_context(phase=phase, step=step, **meta)


def set_run_info(**info) -> None:
    s = _state.session
    if s is not None:
        s.set_run_info(**info)


def flush() -> None:
    s = _state.session
    if s is not None:
        s.flush()


def dump_weights(model, out_dir: str, **kw) -> int:
    from parity.capture.weights import dump_weights as _dump

    return _dump(model, out_dir, **kw)
