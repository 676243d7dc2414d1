"""The noise model: how far correct executions of the same computation land
from the reference, per record, at the run's precision.

An ensemble of reference runs whose every op disagrees with it by one
rounding on a share of its elements (``perturbed``) is stored as ordinary dumps; ``noise_model``
reads each member against the reference into a per-record envelope; the
compare scores every target pair against its record's envelope
(``compare_dumps(..., noise=...)``).
"""

from parity.noise.envelope import NoiseModel, noise_model
from parity.noise.perturb import DEFAULT_RATE, perturbed

__all__ = ["NoiseModel", "noise_model", "perturbed", "DEFAULT_RATE"]
