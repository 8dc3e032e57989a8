"""Shared test setup. Fixture modules live beside this file and are listed here."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures_k8s",
    "tests.fixtures_pg",
    "tests.fixtures_vault",
]


@pytest.fixture(autouse=True)
def _clean_meshca_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees MESHCA_* settings from the shell that started it."""
    for name in list(os.environ):
        if name.startswith("MESHCA_"):
            monkeypatch.delenv(name)
