"""
The loopback limit for B2: a trivial asyncio server that answers the same
commands with the same bytes a POP3 server would send, prepared in memory
in advance, so that all it does per RETR is one ``write``.

Run as ``python -m bench._raw_server --port P --maildir DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path

from bench._wire import encode_body, wire_size


async def _session(
    sock: socket.socket, responses: list[bytes], listing: bytes, stat: bytes
) -> None:
    """
    One connection, on the raw socket: ``loop.sock_sendall`` sends a whole
    response from memory without copying it into a transport buffer (a
    ``Transport.write`` of 10 MB copies and trims a bytearray on Python 3.11,
    which would make this "limit" slower than the servers it bounds).
    """
    loop = asyncio.get_running_loop()
    buffer = b""
    try:
        await loop.sock_sendall(sock, b"+OK raw sender ready\r\n")
        while True:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                return
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                verb, _, arg = line.partition(b" ")
                verb = verb.upper()
                if verb == b"RETR":
                    await loop.sock_sendall(sock, responses[int(arg) - 1])
                elif verb == b"LIST":
                    await loop.sock_sendall(sock, listing)
                elif verb == b"STAT":
                    await loop.sock_sendall(sock, stat)
                elif verb == b"CAPA":
                    # Multi-line: a bare "+OK" would leave a client that asks (curl) waiting.
                    await loop.sock_sendall(sock, b"+OK\r\nUSER\r\n.\r\n")
                elif verb == b"QUIT":
                    await loop.sock_sendall(sock, b"+OK bye\r\n")
                    return
                else:
                    await loop.sock_sendall(sock, b"+OK\r\n")
    finally:
        sock.close()


def load(maildir: Path) -> tuple[list[bytes], bytes, bytes]:
    """The RETR responses, LIST response and STAT line for the messages in ``maildir``."""
    paths = sorted(
        (entry.name, entry.path) for sub in ("new", "cur") for entry in os.scandir(maildir / sub)
    )
    messages = [Path(path).read_bytes() for _, path in paths]
    sizes = [wire_size(m) for m in messages]
    responses = [
        b"+OK %d octets\r\n" % s + encode_body(m) for s, m in zip(sizes, messages, strict=True)
    ]
    lines = b"".join(b"%d %d\r\n" % (n, s) for n, s in enumerate(sizes, 1))
    listing = b"+OK\r\n" + lines + b".\r\n"
    stat = b"+OK %d %d\r\n" % (len(sizes), sum(sizes))
    return responses, listing, stat


async def serve(port: int, maildir: Path) -> None:
    responses, listing, stat = load(maildir)
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    listener.setblocking(False)
    tasks = set()
    while True:
        sock, _ = await loop.sock_accept(listener)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.create_task(_session(sock, responses, listing, stat))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, Path(args.maildir)))


if __name__ == "__main__":
    main()
