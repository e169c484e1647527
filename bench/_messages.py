"""
Test messages and Maildir file names (pure, no I/O).

Messages look like real mail: a header of the usual fields, then text lines
of up to 76 characters with LF line ends (as Maildir stores them), some
starting with ``.`` so that byte-stuffing is exercised.  They are
deterministic for a given seed, so every server is fed the same bytes.

Names follow Dovecot's ``TIME.M<usec>P<pid>Q<n>.HOST,S=<size>,W=<wire>``,
so that popserv and Dovecot both learn a message's size without reading it.
"""

from __future__ import annotations

import random

from attrs import frozen

from bench._wire import wire_size

#: Words of the body text; a line is a random run of them.
_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "mail server message client session reactor deferred protocol maildrop octets "
    "quarterly report meeting agenda invoice attached please find regards thanks"
)
_WORDS = _VOCABULARY.split()

#: The longest body line, as in RFC 2045's recommendation for encoded text.
LINE_WIDTH = 76


def _line(rng: random.Random) -> str:
    words: list[str] = []
    length = 0
    target = rng.randint(20, LINE_WIDTH)
    while length < target:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:LINE_WIDTH]


def make_message(size: int, seed: int, recipient: str = "user@example.org") -> bytes:
    """
    A message of about ``size`` stored octets (LF line ends), the same for
    the same arguments.  About one body line in 40 starts with ``.`` and one
    is a lone ``.``, which a server must stuff.
    """
    rng = random.Random(seed)
    header = (
        f"Return-Path: <sender{seed % 97}@example.net>\n"
        f"Received: from mx.example.net (mx.example.net [192.0.2.{seed % 250 + 1}])\n"
        f"\tby pop.example.org with ESMTPS id {seed:08X};"
        f" Tue, 14 May 2024 10:{seed % 60:02d}:00 +0000\n"
        f"From: Sender {seed % 97} <sender{seed % 97}@example.net>\n"
        f"To: {recipient}\n"
        f"Subject: Benchmark message {seed}\n"
        f"Date: Tue, 14 May 2024 10:{seed % 60:02d}:00 +0000\n"
        f"Message-ID: <{seed}.bench@example.net>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    )
    parts = [header]
    length = len(header)
    n = 0
    while length < size:
        n += 1
        if n == 7:
            line = "."
        elif rng.random() < 0.025:
            line = "." + _line(rng)
        else:
            line = _line(rng)
        line = line[: max(1, size - length - 1)] + "\n"
        parts.append(line)
        length += len(line)
    return "".join(parts).encode("ascii")


def make_large_message(size: int, seed: int, block: bytes | None = None) -> bytes:
    """
    A message of about ``size`` octets, built fast by repeating a 64 KiB block
    of ordinary lines (for the 10 MB messages of B2).
    """
    if block is None:
        block = make_message(64 * 1024, seed=10_000 + seed).split(b"\n\n", 1)[1]
        block = block[: block.rfind(b"\n") + 1]
    head = make_message(0, seed)
    count = max(1, (size - len(head)) // len(block))
    return head + block * count


@frozen
class MaildirName:
    """A Maildir file name in Dovecot's style."""

    seconds: int
    micros: int
    pid: int
    sequence: int
    host: str
    stored: int | None = None
    wire: int | None = None

    def unique(self) -> str:
        """The unique part (the POP3 UIDL popserv reports), size fields included."""
        name = f"{self.seconds}.M{self.micros}P{self.pid}Q{self.sequence}.{self.host}"
        if self.stored is not None:
            name += f",S={self.stored}"
        if self.wire is not None:
            name += f",W={self.wire}"
        return name

    def in_new(self) -> str:
        """The name in ``new/``: the unique part alone."""
        return self.unique()

    def in_cur(self, flags: str = "") -> str:
        """The name in ``cur/``: the unique part and ``:2,FLAGS``."""
        return f"{self.unique()}:2,{flags}"


def name_for(
    message: bytes,
    sequence: int,
    *,
    seconds: int = 1_715_680_000,
    pid: int = 4242,
    host: str = "bench.example.org",
    sizes: bool = True,
) -> MaildirName:
    """
    The Maildir name of ``message``, the ``sequence``-th delivered: one
    second apart per 1,000 messages, so the delivery order is the name order.
    """
    return MaildirName(
        seconds=seconds + sequence // 1000,
        micros=(sequence % 1000) * 1000,
        pid=pid,
        sequence=sequence,
        host=host,
        stored=len(message) if sizes else None,
        wire=wire_size(message) if sizes else None,
    )
