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


async def test_gw04_access_log_request_line_is_the_same_object_as_the_generic_one() -> None:
    fields = {
        "request_id": "r-1",
        "method": "POST",
        "path": '/api/v1/homework/作业/"quoted"\\x',
        "route": "/api/v1/homework/*",
        "status": 201,
        "duration_ms": 1.25,
        "upstream": "homework",
        "upstream_ms": 0.5,
        "client_id": "平台\n1",
        "client_ip": "10.0.0.1",
    }
    generic, direct = io.StringIO(), io.StringIO()
    for stream, write in ((generic, "generic"), (direct, "direct")):
        log = AccessLog(True)
        log.configure(json_lines=True, level="INFO")
        log.stream = stream
        if write == "generic":
            log(**fields)
            log(**{**fields, "upstream": None, "upstream_ms": None, "client_id": None})
        else:
            log.request(*fields.values())
            log.request(
                *{**fields, "upstream": None, "upstream_ms": None, "client_id": None}.values()
            )
        await log.close()
    a = [json.loads(line) for line in generic.getvalue().splitlines()]
    b = [json.loads(line) for line in direct.getvalue().splitlines()]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x.pop("timestamp")[:16] == y.pop("timestamp")[:16]
        assert list(x) == list(y) and x == y


def test_gw04_metrics_fast_observations_equal_prometheus_own() -> None:
    from prometheus_client import generate_latest

    from gateway.telemetry import GatewayMetrics

    fast, reference = GatewayMetrics(), GatewayMetrics()
    # Bucket bounds themselves, values between them, beyond the last one.
    for seconds in (0.0001, 0.0005, 0.00051, 0.001, 0.003, 0.05, 0.7, 3.0, 10.0, 11.0, 100.0):
        fast.observe_request("GET", "/api/v1/homework/*", 200, seconds)
        fast.observe_upstream("homework", 200, seconds)
        fast.observe_upstream("homework", "timeout", None)
        reference.requests.labels("gateway", "GET", "/api/v1/homework/*", "200").inc()
        reference.latency.labels("gateway", "GET", "/api/v1/homework/*").observe(seconds)
        reference.upstream_requests.labels("homework", "200").inc()
        reference.upstream_latency.labels("homework").observe(seconds)
        reference.upstream_requests.labels("homework", "timeout").inc()

    def exposition(metrics: GatewayMetrics) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert exposition(fast) == exposition(reference)
    # A value on a bound counts in that bucket (le: less than or equal).
    assert (
        'gateway_upstream_duration_seconds_bucket{le="0.0005",upstream="homework"} 2.0'
        in exposition(fast)
    )
