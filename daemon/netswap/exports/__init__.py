"""Exports: the storage behind each NBD export name.

``backends`` holds the storage (sparse file, RAM) behind one narrow, thread-safe interface that
moves data only through caller-supplied memoryviews; ``registry`` maps export names to exports,
creating each node's ``swap/<node>`` export on first use.
"""

from .backends import Backend, FileBackend, MemoryBackend, SizeMismatchError
from .registry import Export, ExportError, ExportRegistry, ExportSpec, SwapTemplate

__all__ = [
    "Backend",
    "Export",
    "ExportError",
    "ExportRegistry",
    "ExportSpec",
    "FileBackend",
    "MemoryBackend",
    "SizeMismatchError",
    "SwapTemplate",
]
