"""gpu_agent: the daemon on the GPU desktop, and the simulated desktop it is tested against."""

__version__ = "0.1.0"
