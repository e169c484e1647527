"""
What ``twistd popserv --workers N`` shares between its processes: the
parent's admission, asked by every worker over a socket
(:mod:`popserv.server.workers.admission`).
"""

from popserv.server.workers.admission import (
    AdmissionServer,
    RemoteAdmission,
    connect_admission,
    serve_admission,
)
from popserv.server.workers.commands import AdmissionUnavailable

__all__ = [
    "AdmissionServer",
    "AdmissionUnavailable",
    "RemoteAdmission",
    "connect_admission",
    "serve_admission",
]
