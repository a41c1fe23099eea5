"""The demo's progress bar: tqdm with a status text next to each update."""
from __future__ import annotations

from typing import Optional

from tqdm import tqdm


class Progress(tqdm):
    """``with Progress(total, "label") as bar: bar.update(1, "status")``; writes to stderr."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        super().__init__(total=int(total), desc=label, dynamic_ncols=True, disable=not enabled)

    def update(self, n: int = 1, status: Optional[str] = None) -> Optional[bool]:
        if status:
            self.set_postfix_str(status, refresh=False)
        return super().update(n)
