"""A registry client in its own process, for the crash and concurrency tests.

python -m tests.registry.proc KIND ROOT URL BLOB_URL ITEM [ITEM ...]   ("-": none)

An ITEM is ID:SEED (add ``make_component(SEED)`` as ID) or forget:ID. Prints "ready" once
the registry is open, then waits for a line on stdin before acting, so the test can start
its own adds at the same moment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from registry import Registry
from tests.registry.support import Store, make_component


def _action(reg: Registry, item: str) -> Callable[[], object]:
    first, second = item.split(":")
    if first == "forget":
        return partial(reg.forget, second)
    return partial(reg.add, first, make_component(int(second)).data)


def main(argv: list[str]) -> None:
    kind, root, url, blob_url, *items = argv
    store = Store(kind, Path(root), None if url == "-" else url,
                  None if blob_url == "-" else blob_url)
    reg = store.open(cache=f"cache-{kind}-proc")
    try:
        actions = [_action(reg, item) for item in items]
        print("ready", flush=True)
        sys.stdin.readline()
        for action in actions:
            action()
    finally:
        reg.close()


if __name__ == "__main__":
    main(sys.argv[1:])
