"""DeepSeek-V4 serving engine: ragged batches, slot state, paged compressed KV.

``from runners.engine import Engine`` is the entry point; the pieces
(model, cache, metadata, scheduler, loader, ops) are importable on their own.
"""


def __getattr__(name):
    # Importing the package stays cheap; torch and the model load on first use.
    if name in ("Engine", "GenerationResult", "SamplingParams"):
        from runners.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'runners.engine' has no attribute {name!r}")
