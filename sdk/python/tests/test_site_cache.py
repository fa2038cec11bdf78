"""The data cache of a trainer process that serves many nodes: each folder loaded once while it
is kept, the least recently used let go past the bound, and no folder's data given for
another's."""

from __future__ import annotations

import pytest

import ferry_sdk


def test_folders_load_once_and_the_least_recently_used_is_let_go():
    loads = []

    def load(data_dir):
        loads.append(data_dir)
        return {"rows": data_dir.upper()}

    cache = ferry_sdk.SiteCache(load, max_sites=2)
    assert cache("a")["rows"] == "A" and cache("b")["rows"] == "B"
    assert cache("a")["rows"] == "A", "kept, not loaded again"
    assert loads == ["a", "b"]
    cache("c")  # b is the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache("b")["rows"] == "B"
    assert loads == ["a", "b", "c", "b"]


def test_no_bound_keeps_every_folder_and_a_bad_bound_is_refused():
    cache = ferry_sdk.SiteCache(lambda d: d, max_sites=None)
    for i in range(50):
        cache(f"site-{i}")
    assert len(cache) == 50
    with pytest.raises(ValueError, match="max_sites"):
        ferry_sdk.SiteCache(lambda d: d, max_sites=0)
