"""``parity.tap``: record a value that is not a module output.

This module is imported by ``import parity``, so it stays tiny. A disabled
tap costs one attribute read and one comparison.
"""


class _State:
    session = None  # the active CaptureSession, or None


state = _State()


def tap(name: str, tensor, **meta) -> None:
    """Record ``tensor`` under ``name`` (e.g. "model.layers.3.mlp.topk_ids")
    when capture is on; do nothing otherwise. Never raises."""
    s = state.session
    if s is None:
        return
    s.tap(name, tensor, meta)
