"""A progress bar: tqdm when installed (the demo extra), a plain text bar otherwise."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """``with Progress(total, "label") as bar: bar.update(1, "status")``; writes to stderr."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = int(total), label, enabled
        self.done, self._tqdm, self._last = 0, None, 0.0
        self._start = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm(total=self.total, desc=label, leave=True, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._tqdm = None

    def update(self, n: int = 1, status: Optional[str] = None) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
            if status:
                self._tqdm.set_postfix_str(status, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last < 0.5 and self.done < self.total:
            return  # a plain bar redraws at most twice a second
        self._last = now
        width = 30
        filled = int(width * self.done / max(1, self.total))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{now - self._start:5.1f}s {status or ''}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
