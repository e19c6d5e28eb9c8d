import pytest

# The helpers live in harness.py (shared with tests/events); re-exported for the tests here.
from harness import (  # noqa: F401
    HERE,
    ROOT,
    SAMPLES,
    Procs,
    free_port,
    gateway_bin,
    keygen,
    pkcs1_pair,
    start_downstream,
    wait_http,
)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()
