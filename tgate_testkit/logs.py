"""The T-GATE log as a test or the benchmark reads it: every record of the `tgate` logger, and the
statistics each sampling run logs at its end (a record's `tgate_run` field)."""

from __future__ import annotations

import contextlib
import logging


class RunLog(logging.Handler):
    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.runs: list[dict] = []

    def emit(self, record):
        self.records.append(record)
        if hasattr(record, "tgate_run"):
            self.runs.append(record.tgate_run)

    def messages(self, level: int = logging.INFO) -> list[str]:
        """The messages at `level` or above."""
        return [r.getMessage() for r in self.records if r.levelno >= level]

    @property
    def last_run(self) -> dict | None:
        return self.runs[-1] if self.runs else None

    @contextlib.contextmanager
    def on(self, name: str = "tgate"):
        """Listens to logger `name` (at INFO at least) for the time of the block."""
        logger = logging.getLogger(name)
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(min(level or logging.INFO, logging.INFO))
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
