"""Compare two dumps: float64 metrics, canonical keys, pass/warn/fail verdicts."""
