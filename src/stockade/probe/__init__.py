"""Proof with real packets: probe servers and a concurrent prober.

Modules:

* :mod:`~stockade.probe.protocol` — ``Protocol`` and ``Port`` (``tcp:80``)
* :mod:`~stockade.probe.server` — one process answering TCP/UDP/SCTP in many namespaces
* :mod:`~stockade.probe.launcher` — starts and stops server processes
* :mod:`~stockade.probe.client` — every probe at once from one selector loop
* :mod:`~stockade.probe.matrix` — peer-to-peer matrices of verdicts
* :mod:`~stockade.probe.table` — upstream-style truth tables (pure)
* :mod:`~stockade.probe.sctp` — SCTP detection and the raw-socket stand-in
"""

from stockade.probe.client import Outcome, Probe, ProbeResult, run_probes
from stockade.probe.launcher import ProbeServer
from stockade.probe.matrix import ObservedMatrix, ProbeEndpoint, probe_matrix
from stockade.probe.protocol import Port, Protocol
from stockade.probe.sctp import sctp_mode
from stockade.probe.table import render_table

__all__ = [
    "ObservedMatrix",
    "Outcome",
    "Port",
    "Probe",
    "ProbeEndpoint",
    "ProbeResult",
    "ProbeServer",
    "Protocol",
    "probe_matrix",
    "render_table",
    "run_probes",
    "sctp_mode",
]
