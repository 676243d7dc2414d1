"""parity.tap when parity's capture is importable, a no-op otherwise;
``active()`` says whether a tap would record (so that what only a tap needs
is never computed when capture is off)."""

try:
    from parity import tap
    from parity.capture import active
except Exception:  # capture is optional for running the engine
    def tap(name, tensor, **meta):  # noqa: ARG001
        return None

    def active() -> bool:
        return False

__all__ = ["tap", "active"]
