"""Structured logs: every line carries the call uuid and tenant when it has them.

Tracebacks are printed without variable values (loguru's ``diagnose``) and without the
frames above the catch point (``backtrace``): a value shown in a traceback can be an API
key, a password or a caller's words, and production logs must carry none of them.

JSON lines are one flat object per line (time, level, message, call, tenant, pipeline,
where, and the exception when there is one). Loguru's own ``serialize=True`` writes the
formatted text *and* the whole record on every line, twice the bytes for a log shipper
to parse, with the call's fields buried two levels down.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from loguru import logger

_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[call]}</cyan> <magenta>{extra[tenant]}</magenta> {extra[pipeline]} {message}"
)
_BOUND = ("call", "tenant", "pipeline")


def json_line(record: Any) -> str:
    """One log record as a flat JSON object (no trailing newline)."""
    extra = record["extra"]
    out: dict[str, Any] = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
    }
    for key in _BOUND:
        out[key] = extra.get(key, "-")
    for key, value in extra.items():  # anything else a caller bound (never private keys)
        if key not in _BOUND and not key.startswith("_"):
            out[key] = value
    out["where"] = f"{record['name']}:{record['function']}:{record['line']}"
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        # The plain traceback: file, line and code per frame, no variable values.
        out["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    return json.dumps(out, default=str, ensure_ascii=False)


def _json_format(record: Any) -> str:
    record["extra"]["_json"] = json_line(record)
    return "{extra[_json]}\n"


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Replace loguru's default sink; ``json=True`` emits one JSON object per line."""
    logger.remove()
    logger.configure(extra={"call": "-", "tenant": "-", "pipeline": "-"})
    logger.add(
        sys.stderr,
        level=level.upper(),
        format=_json_format if json else _FORMAT,
        enqueue=False,
        diagnose=False,
        backtrace=False,
    )
