"""Shared test set-up: 8 fake CPU devices for sharding tests, the golden fixtures folder."""
import os
import pathlib

# Must happen before JAX is imported anywhere: every test process sees 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = pathlib.Path(os.environ.get("MOLMO_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not GOLDEN_DIR.is_dir():
        raise FileNotFoundError(
            f"golden fixtures not found at {GOLDEN_DIR}; set MOLMO_GOLDEN to the shared/golden folder")
    return GOLDEN_DIR
