"""Shared fixtures: paths to the real measured phase data beside the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_qpi_dir() -> Path:
    env = os.environ.get("OPDCELLS_REAL_QPI")
    return Path(env) if env else REPO.parent / "shared" / "real_qpi"


@pytest.fixture(scope="session")
def real_qpi() -> Path:
    """Folder ``shared/real_qpi`` (override with $OPDCELLS_REAL_QPI); tests skip loudly if absent."""
    path = _real_qpi_dir()
    if not path.is_dir():
        pytest.skip(f"real QPI data not found at {path}")
    return path


def _cases_dir() -> Path:
    env = os.environ.get("OPDCELLS_CASES")
    return Path(env) if env else REPO.parent / "shared" / "cases"


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    """Folder ``shared/cases`` (override with $OPDCELLS_CASES); tests skip loudly if absent."""
    path = _cases_dir()
    if not path.is_dir():
        pytest.skip(f"failing-case folder not found at {path}")
    return path
