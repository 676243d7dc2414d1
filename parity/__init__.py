"""parity: find where two implementations of one network stop agreeing.

The package imports lazily so that ``import parity`` inside a host program
costs almost nothing; ``parity.tap`` is the one hot entry point.
"""

__version__ = "0.1.0"

from parity.capture.taps import tap  # noqa: E402  (tap must be cheap to reach)


def __getattr__(name):
    # Heavy pieces (pandas, the compare stack) load on first use only.
    if name == "compare_dumps":
        from parity.compare.api import compare_dumps
        return compare_dumps
    if name == "layer_bisect":
        from parity.bisect import layer_bisect
        return layer_bisect
    if name == "slot_invariance":
        from parity.slots import slot_invariance
        return slot_invariance
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
