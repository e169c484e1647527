"""A blocking socket read up to markers, for the raw POP3 and SMTP test clients."""

from __future__ import annotations

import socket


class MarkedReader:
    """Reads ``sock`` through a buffer, a piece at a time up to a marker."""

    sock: socket.socket
    buffer: bytes = b""

    def until(self, marker: bytes) -> bytes:
        """Everything up to ``marker`` (left out), taken from the buffer; EOFError at EOF."""
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        part, self.buffer = self.buffer.split(marker, 1)
        return part

    def closed(self) -> bool:
        """Whether the server closed the connection (EOF or a reset) before sending more."""
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
