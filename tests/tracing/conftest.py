import pathlib
import sys

import pytest

# The peers and helpers of tests/interop (Cobo-style servers, the TSS Node client, harness.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "interop"))

from harness import Procs  # noqa: E402
from jaeger import Jaeger  # noqa: E402


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory):
    """One Jaeger all-in-one (in-memory storage) for the session; each test uses a service name
    of its own."""
    j = Jaeger(tmp_path_factory.mktemp("jaeger")).start()
    yield j
    j.stop()
