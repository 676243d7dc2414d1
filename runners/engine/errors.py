"""The engine's user-facing error type is parity's, when parity is installed
(the engine runs without it)."""

try:
    from parity.errors import ParityError
except ImportError:
    class ParityError(Exception):
        """Bad input or usage: a message for the user, never a traceback."""

__all__ = ["ParityError"]
