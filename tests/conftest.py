"""Fixtures shared by the math tests."""

import pytest

import ddpm


@pytest.fixture(scope="module")
def diff():
    """The DDPM paper's process: linear betas 1e-4 -> 0.02, T = 1000."""
    return ddpm.GaussianDiffusion(ddpm.linear_beta_schedule(1000))
