"""parity.tap when parity's capture is importable, a no-op otherwise."""

try:
    from parity import tap
except Exception:  # capture is optional for running the engine
    def tap(name, tensor, **meta):  # noqa: ARG001
        return None

__all__ = ["tap"]
