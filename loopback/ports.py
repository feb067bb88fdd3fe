"""Free TCP ports on 127.0.0.1, chosen by the kernel.

A port is free when it is chosen and may be taken by another process before our server binds
it: the launchers retry on fresh ports when a server does not come up.
"""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together while they are chosen,
    so none is answered twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    """One free loopback port."""
    (port,) = free_ports(1)
    return port
