"""Real macOS command outputs recorded from public sources (see fixtures/macos/SOURCES.md)."""

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "macos"


def recorded(name: str) -> str:
    return (FIXTURES / name).read_text()
