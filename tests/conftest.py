import collections
import os
from pathlib import Path

import numpy as np
import pytest

# Ray >= 2.59 may turn on token auth; the tests run a local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHARED_DATA = Path(os.environ.get("LADE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared/data beside the checkout")
        pytest.skip(f"{path} not available")
    return path


def split_counts(path: Path) -> list[int]:
    """Class counts of a `<path> <label>` split list, written independently of lade_core's reader."""
    c = collections.Counter(int(line.split()[-1]) for line in path.read_text().splitlines() if line.strip())
    return [c[k] for k in range(max(c) + 1)]


@pytest.fixture(scope="session")
def places_train_counts() -> list[int]:
    return split_counts(shared_file("Places_LT", "Places_LT_train.txt"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session, with spare logical CPUs so Ray Data never starves behind workers."""
    import ray

    from lade_core.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
