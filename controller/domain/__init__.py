"""The controller's policy core: pure, synchronous, deterministic.

Nothing in this package does I/O, awaits, reads a clock or keeps global state. Every function
takes plain values (and `now` when time matters) and returns a decision value that carries a
human-readable reason. `tests/unit/test_core_purity.py` walks the imports to keep it that way.
"""
