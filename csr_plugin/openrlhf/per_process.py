"""One instance per process of what is expensive to build (CLIP weights, vocabulary scans).

It lives in an importable module, not in the files OpenRLHF loads by path: each
``spec_from_file_location`` load is a new module with new globals, so a cache
kept there would be rebuilt by every load.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Hashable

_instances: dict[Hashable, Any] = {}
_lock = threading.Lock()


def shared(key: Hashable, build: Callable[[], Any]) -> Any:
    with _lock:
        if key not in _instances:
            _instances[key] = build()
        return _instances[key]
