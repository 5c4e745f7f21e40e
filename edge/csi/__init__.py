"""CSI ingestion: one interface over Intel 5300, Atheros, nexmon, ESP32, PicoScenes and array files,
and a live UDP source of ESP32-CSI-Tool lines. Everything comes out as a CSICapture:
complex64 CSI (time, subcarrier, rx, tx) with timestamps (see capture.py).
"""

from edge.csi.capture import CSICapture, estimate_rate, interp_at, resample_uniform
from edge.csi.formats import FORMATS, detect_format, read_csi, read_npz_receivers
from edge.csi.udp import UDPSource

__all__ = [
    "CSICapture",
    "FORMATS",
    "UDPSource",
    "detect_format",
    "estimate_rate",
    "interp_at",
    "read_csi",
    "read_npz_receivers",
    "resample_uniform",
]
