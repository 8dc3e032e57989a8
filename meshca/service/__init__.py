"""Use cases over the core's ports. Async, but free of transports and storage."""
