"""ringview and ``virtq inspect`` against hostile input: a FIFO does not block, bad
MappedFile arguments and damaged snapshots are refused with ArgumentError.

Every test names the finding of the hostile-input campaign it guards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtq.errors import ArgumentError
from virtq.memory import MemfdRegion
from virtq.queue import make_queue, ring_layout
from virtq.ringview import MappedFile, load_snapshot, save_snapshot


def test_inspect_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """Finding: ``virtq inspect FIFO --queue-size 16`` blocked forever in open()."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "virtq", "inspect", str(fifo),
                           "--queue-size", "16"], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr.strip().splitlines()[-1]  # argparse's usage + one line
    with pytest.raises(ArgumentError):
        MappedFile(fifo, 16)


@pytest.mark.parametrize("kw", [{"path": None}, {"path": 3}, {"iova": math.nan},
                                {"iova": -1}, {"iova": "0"}])
def test_mapped_file_arguments(tmp_path: Path, kw: dict[str, Any]) -> None:
    """Finding: MappedFile(None, 16) raised TypeError, iova=nan ValueError."""
    ring = tmp_path / "ring"
    ring.write_bytes(bytes(4096))
    args: dict[str, Any] = {"path": ring, "queue_size": 16}
    with pytest.raises(ArgumentError):
        MappedFile(**(args | kw))


@pytest.fixture(scope="module")
def snapshot_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = ring_layout(8, indirect_size=4)
    with MemfdRegion(layout.nbytes + 4096) as region:
        q = make_queue(region, layout, iova=region.host_addr, indirect=True)
        buf = region.host_addr + layout.nbytes
        for i in range(3):
            q.add([(buf + 64 * i, 16)], [(buf + 1024, 8)], i)
        q.publish()
        path = tmp_path_factory.mktemp("snap") / "ring.json"
        save_snapshot(q, path)
        q.close()
    return path.read_text()


@given(field=st.sampled_from(["published", "next_avail", "last_used", "in_flight_heads"]),
       value=st.one_of(st.sampled_from(["x", None, {}, [], 1.5, True, [-1], [8], ["0"]]),
                       st.builds(object).map(repr)))
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_snapshot_is_refused(snapshot_text: str, field: str, value: Any) -> None:
    """Finding: a snapshot whose driver counters were damaged (a string, a dict, a head of
    -1) passed load_snapshot and failed while being drawn: a traceback from ``virtq
    inspect`` (KeyError in render_svg, ValueError/TypeError in ringview.model)."""
    data = json.loads(snapshot_text)
    if field == "in_flight_heads" and isinstance(value, list) and not value:
        return  # an empty list is a valid (nothing in flight) value
    data["snapshot"][field] = value
    with pytest.raises(ArgumentError):
        load_snapshot(json.dumps(data))


@pytest.mark.parametrize("text", [5, None, b"\xff", 1.5])
def test_load_snapshot_of_a_non_text(text: Any) -> None:
    """Finding: load_snapshot(5) raised json's bare TypeError."""
    with pytest.raises(ArgumentError):
        load_snapshot(text)
