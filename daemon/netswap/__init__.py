"""netswap: serves swap space to diskless Linux nodes over NBD from a locked memory pool."""

__version__ = "0.1.0"
