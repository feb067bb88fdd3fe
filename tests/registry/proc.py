"""A registry client in its own process, for the crash and concurrency tests.

python -m tests.registry.proc KIND ROOT URL ID:SEED [ID:SEED ...]   (URL "-" for none)
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.registry.support import Store, make_component


def main(argv: list[str]) -> None:
    kind, root, url, *items = argv
    store = Store(kind, Path(root), None if url == "-" else url)
    reg = store.open(cache=f"cache-{kind}-proc")
    try:
        for item in items:
            cid, seed = item.split(":")
            reg.add(cid, make_component(int(seed)).data)
    finally:
        reg.close()


if __name__ == "__main__":
    main(sys.argv[1:])
