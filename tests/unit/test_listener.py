"""``serve --processes N`` spreads connections over its workers, and a port in use fails at start-up."""

from __future__ import annotations

import socket

import pytest

from gateway.supervise import Listener

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="one socket per worker needs SO_REUSEPORT")


def _accepted(sock: socket.socket) -> int:
    sock.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_each_worker_gets_a_share_of_the_connections() -> None:
    port = Listener("127.0.0.1", 0)
    workers = [port.for_worker(), port.for_worker()]
    clients = [socket.create_connection(port.address) for _ in range(64)]
    try:
        counts = [_accepted(w) for w in workers]
        # the reserved socket never listens: every connection reached a worker, and both got some
        # (a shared socket gave one worker nearly all of them; 64 hashed connections: each gets 32 ± 4)
        assert sum(counts) == 64
        assert min(counts) >= 16, counts
    finally:
        for sock in [*clients, *workers, port.sock]:
            sock.close()


def test_a_dead_worker_leaves_the_connections_to_the_others() -> None:
    port = Listener("127.0.0.1", 0)
    alive, dead = port.for_worker(), port.for_worker()
    dead.close()
    clients = [socket.create_connection(port.address) for _ in range(16)]
    try:
        assert _accepted(alive) == 16
    finally:
        for sock in [*clients, alive, port.sock]:
            sock.close()


def test_a_port_in_use_fails_before_any_worker_starts() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError):
            Listener("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
