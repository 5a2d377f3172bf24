from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import ProcessGroup

pytest_plugins = ["tests.consul_agent"]


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()
