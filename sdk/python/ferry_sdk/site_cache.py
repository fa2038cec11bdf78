"""A node's data kept in memory between tasks, for a trainer process that serves many nodes
(``ferry simulate``'s pool of long-lived workers): each task names its node's ``data_dir``,
and loading a site's files every task would cost more than training on them."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional


class SiteCache:
    """What ``load(data_dir)`` returns, kept for the ``max_sites`` folders used most recently;
    the least recently used is let go when another is loaded. ``max_sites=None`` keeps every
    folder (a per-node process, or sites that all fit in memory)."""

    def __init__(self, load: Callable[[str], Any], max_sites: Optional[int] = 8):
        if max_sites is not None and max_sites < 1:
            raise ValueError(f"max_sites must be at least 1 (or None for no bound), got {max_sites}")
        self._load = load
        self._max = max_sites
        self._kept: "OrderedDict[str, Any]" = OrderedDict()

    def __call__(self, data_dir: str) -> Any:
        """The data of ``data_dir``, loaded now if it is not kept."""
        if data_dir in self._kept:
            self._kept.move_to_end(data_dir)
            return self._kept[data_dir]
        data = self._load(data_dir)
        self._kept[data_dir] = data
        if self._max is not None and len(self._kept) > self._max:
            self._kept.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, data_dir: str) -> bool:
        return data_dir in self._kept
