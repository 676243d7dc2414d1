"""Errors the library raises for bad input.

The CLI turns every ``ParityError`` into one line on stderr and exit code 2,
and so (at its top level) an ``OSError``, a decoding error or a malformed
safetensors file that reaches it; anything else is a bug in parity and keeps
its traceback. Raise these with the file and the problem in the message.
"""


class ParityError(Exception):
    """Bad input or usage: a message for the user, never a traceback."""


class DumpError(ParityError):
    """A dump directory is missing, incomplete or corrupt."""


class ConfigError(ParityError):
    """A PARITY_* variable or a config file could not be parsed."""
