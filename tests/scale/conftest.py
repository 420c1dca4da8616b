"""tests/scale: `ray` marks the tests that start a local Ray (one server per module: Ray takes ~30 s to start)."""
from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "ray: starts a local Ray cluster (deselect with -m 'not ray')")
