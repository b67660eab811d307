"""dwcp_lstm: next-step forecasts of WAN link throughput, RTT, packet loss and jitter (PyTorch Lightning, ONNX)."""

__version__ = "0.1.0"
