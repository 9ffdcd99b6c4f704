"""Evaluation and benchmarks: they call the engine, never the reverse."""
