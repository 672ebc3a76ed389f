"""The T-GATE log and run statistics as a test or the benchmark reads them: every record of the
`tgate` logger, and the statistics each sampling run hands its listeners at its end (a RunStats,
kept as a dict), with the log record that summed it up."""

from __future__ import annotations

import contextlib
import logging
import sys


def engines() -> list:
    """Every loaded copy of the engine: the tests' own `tgate` and the pack's as ComfyUI loaded it."""
    return [
        module
        for name, module in list(sys.modules.items())
        if (name == "tgate" or name.endswith(".tgate")) and hasattr(module, "add_run_listener")
    ]


class RunLog(logging.Handler):
    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.runs: list[dict] = []

    def emit(self, record):
        self.records.append(record)

    def add_run(self, stats) -> None:
        """A run listener (tgate.add_run_listener): keeps the run's statistics as a dict."""
        self.runs.append(stats.as_dict())

    def messages(self, level: int = logging.INFO) -> list[str]:
        """The messages at `level` or above."""
        return [r.getMessage() for r in self.records if r.levelno >= level]

    @property
    def last_run(self) -> dict | None:
        return self.runs[-1] if self.runs else None

    def summaries(self) -> list[tuple[logging.LogRecord, dict]]:
        """(its summary record, its statistics) for each run that ended while listening."""
        return [(next(r for r in self.records if r.getMessage() == run["summary"]), run) for run in self.runs]

    @contextlib.contextmanager
    def on(self, name: str = "tgate"):
        """Listens to logger `name` (at INFO at least) and to the runs of every loaded engine for
        the time of the block."""
        logger = logging.getLogger(name)
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(min(level or logging.INFO, logging.INFO))
        listening = engines()
        for engine in listening:
            engine.add_run_listener(self.add_run)
        try:
            yield self
        finally:
            for engine in listening:
                engine.remove_run_listener(self.add_run)
            logger.removeHandler(self)
            logger.setLevel(level)
