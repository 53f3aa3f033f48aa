"""Structured logs: every line carries the call uuid and tenant when it has them.

Tracebacks are printed without variable values (loguru's ``diagnose``) and without the
frames above the catch point (``backtrace``): a value shown in a traceback can be an API
key, a password or a caller's words, and production logs must carry none of them.
"""

from __future__ import annotations

import sys

from loguru import logger

_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[call]}</cyan> <magenta>{extra[tenant]}</magenta> {extra[pipeline]} {message}"
)


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Replace loguru's default sink; ``json=True`` emits one JSON object per line."""
    logger.remove()
    logger.configure(extra={"call": "-", "tenant": "-", "pipeline": "-"})
    if json:
        logger.add(
            sys.stderr,
            level=level.upper(),
            serialize=True,
            enqueue=False,
            diagnose=False,
            backtrace=False,
        )
    else:
        logger.add(
            sys.stderr,
            level=level.upper(),
            format=_FORMAT,
            enqueue=False,
            diagnose=False,
            backtrace=False,
        )
