import pathlib
import sys

import pytest

# The peers and helpers of tests/interop (Cobo-style servers, the TSS Node client, harness.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "interop"))

from harness import Procs  # noqa: E402


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()
