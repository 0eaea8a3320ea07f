"""graceful-ray: graceful model upgrades on Ray."""

__version__ = "0.1.0"
