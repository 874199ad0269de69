"""Structured log lines on stderr (logfmt), as systemd's journal likes them."""

from __future__ import annotations

import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        msg = record.getMessage().replace('"', '\\"')
        line = f'time={ts}.{ms:03d}Z level={record.levelname.lower()} ' \
               f'logger={record.name} msg="{msg}"'
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                text = str(v)
                line += f" {k}=" + (f'"{text}"' if " " in text or not text else text)
        if record.exc_info:
            line += ' error="' + self.formatException(record.exc_info).replace(
                "\n", "\\n").replace('"', '\\"') + '"'
        return line


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger("stockade")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
