"""JSON log lines (``IMGCLF_LOG_FORMAT=json``): one object per line, what log shippers parse.

BentoML has no setting for its log format: it configures its own handlers (``bento.SERVER_LOGGERS``)
in the serving process and in every worker before the service module is imported. So the service
swaps the formatter of those handlers on import, in each process, and every line they write (the
access log, BentoML's messages, ours) comes out as JSON.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from service.http.bento import SERVER_LOGGERS

# What BentoML's tracing filter adds to a record, when it is set.
EXTRAS = ("component", "trace_id", "span_id", "sampled", "request_id")


class JsonFormatter(logging.Formatter):
    """time (UTC, ms), level, logger, message, the tracing fields BentoML sets, and any traceback."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out |= {k: getattr(record, k) for k in EXTRAS if getattr(record, k, None) not in (None, "", 0, "0")}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def use_json_logs() -> None:
    """Give every handler of BentoML's configured loggers the JSON formatter (this process).

    ONNX Runtime's C++ logger writes its own coloured text to stderr, past Python's logging: it is
    left errors only (its warnings here were about its telemetry ID on a read-only home).
    """
    import onnxruntime

    for name in SERVER_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(JsonFormatter())
    onnxruntime.set_default_logger_severity(3)
