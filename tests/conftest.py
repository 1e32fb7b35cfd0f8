"""Shared fixtures: one small simulated night per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.simulate import SimOptions, load_truth, simulate_night

SMALL_OPTS = SimOptions(seed=7, small=True, science_per_target=8)


@pytest.fixture(scope="session")
def small_night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated night (seed 7, 8 science frames per target and band)."""
    out = tmp_path_factory.mktemp("night")
    simulate_night(out, SMALL_OPTS)
    return out


@pytest.fixture(scope="session")
def small_truth(small_night: Path):
    """The truth of :func:`small_night`."""
    return load_truth(small_night)
