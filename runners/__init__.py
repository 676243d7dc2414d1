"""Things that run models: the engine, the reference with capture, side by side."""
