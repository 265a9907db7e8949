"""IMGCLF_LOG_FORMAT=json: each record one JSON object (the container test reads a real server's lines)."""

from __future__ import annotations

import json
import logging
import sys

from service.http.logs import JsonFormatter


def test_a_record_with_a_traceback_is_one_json_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("bentoml.access", logging.ERROR, __file__, 1, "%s failed", ("GET /x",),
                                   exc_info=sys.exc_info())
    record.trace_id, record.span_id = "0", "ab12"  # BentoML's tracing filter: 0 means no trace
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert (out["level"], out["logger"], out["message"], out["span_id"]) == ("ERROR", "bentoml.access",
                                                                            "GET /x failed", "ab12")
    assert "trace_id" not in out and "ValueError: bad" in out["exception"] and out["time"].endswith("Z")
