"""
The popserv benchmark suite (issue 6): ``python -m bench``, see README.rst.

The pure helpers are importable for tests: the wire checker a load client
uses, and the message and Maildir name generator.
"""

from bench._messages import MaildirName, make_large_message, make_message, name_for
from bench._report import Measurement, Target, percentile
from bench._wire import (
    Body,
    BodyReader,
    DesyncError,
    check_retr,
    encode_body,
    parse_sizes,
    read_body,
    wire_size,
)

__all__ = [
    # Wire checks
    "Body",
    "BodyReader",
    "DesyncError",
    "check_retr",
    "encode_body",
    "parse_sizes",
    "read_body",
    "wire_size",
    # Test data
    "MaildirName",
    "make_large_message",
    "make_message",
    "name_for",
    # Results
    "Measurement",
    "Target",
    "percentile",
]
