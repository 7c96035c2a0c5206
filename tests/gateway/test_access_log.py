"""GW-04: the access log's direct JSON lines (what the gateway writes when the
platform logs JSON): one parseable object per request, batched writes."""

from __future__ import annotations

import asyncio
import io
import json

from gateway.telemetry import AccessLog


async def test_gw04_access_log_lines_are_json_objects_written_in_batches() -> None:
    stream = io.StringIO()
    log = AccessLog(True)
    log.configure(json_lines=True, level="INFO")
    log.stream = stream
    for i in range(3):
        log(request_id=f"r{i}", method="GET", path="/api/v1/homework/x", status=200, client_id=None)
    assert stream.getvalue() == ""  # not yet: one write for the batch
    await asyncio.sleep(log.FLUSH_SECONDS * 5)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2"]
    first = lines[0]
    assert first["event"] == "request" and first["level"] == "info"
    assert first["status"] == 200 and first["client_id"] is None
    assert first["timestamp"].endswith("Z")
    # Nothing is left behind at shutdown.
    log(request_id="last", status=502)
    await log.close()
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "last"


async def test_gw04_access_log_follows_the_log_level() -> None:
    stream = io.StringIO()
    log = AccessLog(True)
    log.configure(json_lines=True, level="WARNING")
    log.stream = stream
    log(request_id="r", status=200)
    await log.close()
    assert stream.getvalue() == ""
