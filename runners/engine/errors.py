"""The engine's user-facing error type is parity's, when parity imports."""

try:
    from parity.errors import ParityError
except Exception:  # parity's package init may be mid-change in a shared checkout
    class ParityError(Exception):
        """Bad input or usage: a message for the user, never a traceback."""

__all__ = ["ParityError"]
