"""A blocking connection that speaks wire frames (tbmesh.net.wire), outside asyncio."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from typing import Any

from tbmesh.net import wire

READ_SIZE = 1 << 20


class Connection:
    """wire frames over a blocking stream socket, for a thread or a process of its own (a
    tensor group's worker and its parent, its ranks' control channel): sends from several
    threads take turns; one thread receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = wire.FrameDecoder()
        self.send_lock = threading.Lock()

    def send(self, message: Any, timeout: float | None = None) -> None:
        """Send one frame; with `timeout`, give up (TimeoutError) when another thread's send
        holds the connection that long."""
        if not self.send_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError
        try:
            self.sock.sendall(b"".join(bytes(part) for part in wire.encode(message)))
        finally:
            self.send_lock.release()

    def receive(self, timeout: float | None = None) -> Any | None:
        """The next message; None at the end of the stream. Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (message := self.decoder.next_message()) is None:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise TimeoutError
            data = self.sock.recv(READ_SIZE)
            if not data:
                self.decoder.feed_eof()
                return self.decoder.next_message()
            self.decoder.feed(data)
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
