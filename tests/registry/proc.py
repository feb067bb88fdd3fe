"""A registry client in its own process, for the crash and concurrency tests.

python -m tests.registry.proc KIND ROOT URL BLOB_URL ID:SEED [ID:SEED ...]   ("-": none)

Prints "ready" once the registry is open, then waits for a line on stdin before adding,
so the test can start its own adds at the same moment.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.registry.support import Store, make_component


def main(argv: list[str]) -> None:
    kind, root, url, blob_url, *items = argv
    store = Store(kind, Path(root), None if url == "-" else url,
                  None if blob_url == "-" else blob_url)
    reg = store.open(cache=f"cache-{kind}-proc")
    try:
        payloads = [(cid, make_component(int(seed)).data)
                    for cid, seed in (item.split(":") for item in items)]
        print("ready", flush=True)
        sys.stdin.readline()
        for cid, data in payloads:
            reg.add(cid, data)
    finally:
        reg.close()


if __name__ == "__main__":
    main(sys.argv[1:])
