"""The run's log file: ``RUN/train.log`` gets the resfit log while a run (or its ``--lr auto``
sweep) works in the folder. Apart from :mod:`.run` so that :mod:`.lr_auto`, which ``train``
calls, can write there too without importing the run back."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("resfit")


class FileLog:
    """Send the resfit log to RUN/train.log for the duration of a run."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.handler = (
            logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
            if enabled
            else None
        )
        if self.handler:
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> FileLog:
        if self.handler:
            log.addHandler(self.handler)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handler:
            log.removeHandler(self.handler)
            self.handler.close()
