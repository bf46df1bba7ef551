"""amp4ec: calibrate, simulate and replay partitioned DNN inference on edge containers."""

__version__ = "0.1.0"
