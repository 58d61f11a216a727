"""personaxis: map, monitor and stabilize the persona of open-weights chat models."""

__version__ = "0.1.0"
