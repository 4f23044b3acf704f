"""RUN_DIR/metrics.jsonl (one JSON object per line) and rank 0's progress display."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hpc_multires.files import locked, write_atomic


class MetricsLog:
    """Appends records to metrics.jsonl where enabled (each stage's first rank) and does
    nothing elsewhere. Concurrent stages' first ranks append to the one file, each record
    under the file's POSIX lock."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        # Concurrent stages have their roots append to this one file, often from other
        # nodes. On NFS an append is not atomic between clients, but under a POSIX lock
        # the client rereads the file's end and writes it back before unlocking; where
        # the file system has no locks the append goes ahead as it is.
        with open(self.path, "a") as f, locked(f, posix=True):
            f.write(line)
            f.flush()

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the log with `records`, through a temporary file (a crash loses nothing)."""
        if not self.enabled:
            return
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log. A line that is not a JSON object (a write cut short by
    a crash or a full disk) is skipped with a warning rather than making the run unreadable;
    a resumed run rewrites the log without it."""
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            print(f"hpc-multires: warning: {path} line {n} is not a whole record (a write cut "
                  "short?); skipped", file=sys.stderr)
            continue
        records.append(record)
    return records


class Progress:
    """A one-line bar on a terminal; plain lines every `interval_s` in a batch log."""

    def __init__(self, total_steps: int, enabled: bool, interval_s: float,
                 stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else interval_s
        self._last = 0.0

    def update(self, step: int, epoch: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        frac = step / max(self.total, 1)
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:<30}] {100 * frac:5.1f}% epoch {epoch} {text}\x1b[K")
        else:
            self.stream.write(f"step {step}/{self.total} ({100 * frac:.0f}%) epoch {epoch} "
                              f"{text}\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A line that stays (epoch summaries)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
