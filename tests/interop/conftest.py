import pytest

# The helpers live in harness.py, shared with tests/events.
from harness import Procs


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()
