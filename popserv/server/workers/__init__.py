"""
What ``twistd popserv --workers N`` shares between its processes: the
parent's admission, asked by every worker over a socket
(:mod:`popserv.server.workers.admission`).
"""

from popserv.server.workers.admission import (
    AdmissionServer,
    AdmissionUnavailable,
    RemoteAdmission,
    connect_admission,
    serve_admission,
)

__all__ = [
    "AdmissionServer",
    "AdmissionUnavailable",
    "RemoteAdmission",
    "connect_admission",
    "serve_admission",
]
