"""The serving engine: see engine.py."""
