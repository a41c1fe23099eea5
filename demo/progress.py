"""The demo's progress bar: tqdm with a status text next to each update."""

from __future__ import annotations

from tqdm import tqdm


class Progress(tqdm):
    """``with Progress(total, "label", unit="step") as bar: bar.update(1, "status")``; writes to
    stderr. One bar counts one kind of work, so its rate and ETA are meaningful."""

    def __init__(self, total: int, label: str, unit: str = "it", enabled: bool = True) -> None:
        super().__init__(total=int(total), desc=label, unit=unit, dynamic_ncols=True, disable=not enabled)

    def update(self, n: int = 1, status: str | None = None) -> bool | None:
        if status:
            self.set_postfix_str(status, refresh=False)
        return super().update(n)
