"""The engine's OpenAI-compatible HTTP server (FastAPI on uvicorn; the
``serve`` extra). ``Serving(engine).start()`` serves from a thread;
``python -m runners.serve`` is the command line. See docs/serve.md."""
