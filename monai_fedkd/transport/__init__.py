"""How a query reaches a site and its answer comes back: one small interface, several implementations.

Only tensors shaped like a network's inputs or outputs (and a few scalars) cross a transport; never a parameter.
"""

from monai_fedkd.transport.base import QueryRequest, SiteAnswer, SiteAnswerError, Transport, TransportStats, payload_bytes
from monai_fedkd.transport.in_process import InProcessTransport

__all__ = ["InProcessTransport", "QueryRequest", "SiteAnswer", "SiteAnswerError", "Transport", "TransportStats", "payload_bytes"]
