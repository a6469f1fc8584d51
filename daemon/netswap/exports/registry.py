"""Export names -> Export objects: static exports from the config, per-node swap made on demand.

A node asks for ``swap/<node>`` and gets its own swap export, created on first use from the swap
template: a sparse ``<swap directory>/<node>.img`` (mode 0600) or a RAM map.  That is the whole
point of netswap's provisioning: no per-node configuration.

Rules an operator can rely on:

* Node names are RFC 1123 host labels in lower case: ``[a-z0-9]``, inner ``-``, 1 to 63
  characters.  No leading or trailing ``-`` (a file called ``-foo.img`` reads as an option to
  every shell tool an operator would clean up with), no upper case (one node, one file, also on
  case-insensitive tools), no dots (so never ``..``), no ``/``, no NUL.  Anything else is an
  unknown export: ``lookup`` returns None and nothing is created.
* The image path is built from the validated node only, opened with O_NOFOLLOW, and checked
  to resolve inside the swap directory, so no export name reaches a file elsewhere.
* Images from a previous run are reopened: a daemon restart keeps every node's swap.  An image
  whose size differs from the template (the operator changed the size) is an error for that
  node, never silently resized (see backends.SizeMismatchError).
* Each export exists once.  Every connection to it shares the same Export and backend, which is
  what makes CAN_MULTI_CONN honest (a flush on one connection covers writes on all of them).
* Static exports are opened at construction, so configuration mistakes fail at start-up, not at
  a node's first connect.  File exports are created sparse (0600) if missing, unless read-only.
  Memory exports are mapped at start too: pages are only allocated when written, so "at start"
  costs no RAM, but the kernel charges the commit then (see backends.MemoryBackend), so an
  impossible size fails at start-up too.
* Closing the registry flushes every export before closing it.

Input objects are duck-typed: anything with the attributes of ExportSpec / SwapTemplate works
(config.ExportConfig and config.SwapConfig are built to match).  A swap object with
``enabled = False`` is the same as no template.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..swap import store
from ..swap.nodes import SWAP_PREFIX, swap_node_from_name, valid_node
from .backends import Backend, FileBackend, MemoryBackend

log = logging.getLogger(__name__)

__all__ = [
    "SWAP_PREFIX",
    "Export",
    "ExportError",
    "ExportRegistry",
    "ExportSpec",
    "SwapTemplate",
    "swap_node_from_name",
]

BACKEND_KINDS = ("file", "memory")

class ExportError(OSError):
    """An export exists in principle but cannot be opened or created (I/O error, disk full, a
    swap image of the wrong size, a bad static export definition).

    Distinct from "unknown" (lookup returns None): the server should log it and refuse the
    option with an error reply, and the operator should see it.  It is an OSError, carrying the
    underlying errno where there is one, because that is what it nearly always is and what
    callers already handle as "the environment failed us": the daemon's start-up path logs
    OSError and exits 1, a connection thread logs it and closes the connection.
    """

    @classmethod
    def wrap(cls, what: str, cause: OSError | ValueError) -> OSError:
        """``cause`` with ``what`` in front; an ExportError already says what it is about."""
        if isinstance(cause, ExportError):
            return cause
        if isinstance(cause, OSError) and cause.strerror:
            # str(OSError) would repeat "[Errno N]"; keep the file name, which says the most.
            detail = cause.strerror
            if cause.filename is not None:
                detail = f"{cause.filename}: {detail}"
        else:
            detail = str(cause)
        return cls(getattr(cause, "errno", None) or errno.EINVAL, f"{what}: {detail}")


@dataclass(frozen=True)
class ExportSpec:
    """One static export, as the config describes it."""

    name: str
    backend: str  # "file" | "memory"
    path: Path | None  # file backend only
    size: int | None  # None: a file export takes the existing file's size
    read_only: bool = False
    description: str = ""


@dataclass(frozen=True)
class SwapTemplate:
    """How to make a node's swap export on first use."""

    size: int
    backend: str  # "file" | "memory"
    directory: Path  # relative paths are taken relative to the state directory
    description: str = ""


# eq=False: exports are compared and hashed by identity, so later code can key per-export state
# (reservations, connection counts) on the Export object itself.
@dataclass(eq=False)
class Export:
    name: str
    description: str
    size: int
    read_only: bool
    backend: Backend
    is_swap: bool  # a per-node swap export; its connections get tagged emergency
    node: str | None  # the node name, for per-node swap exports


class ExportRegistry:
    def __init__(
        self,
        exports: Sequence[ExportSpec],
        swap: SwapTemplate | None,
        state_dir: Path,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._swap = swap if swap is not None and getattr(swap, "enabled", True) else None
        self._lock = threading.Lock()  # guards creation of swap exports and close
        self._closed = False
        self._static: dict[str, Export] = {}
        self._specs: dict[str, object] = {}  # name -> the spec its static export came from
        self._retired: list[Export] = []  # removed by a reload; closed with the registry
        self._nodes: dict[str, Export] = {}  # node name -> its swap export

        if self._swap is not None:
            if self._swap.backend not in BACKEND_KINDS:
                raise ExportError(errno.EINVAL, f"swap: unknown backend {self._swap.backend!r}")
            if not self._swap.size or self._swap.size <= 0:
                raise ExportError(errno.EINVAL, "swap: size must be positive")
            directory = Path(self._swap.directory)
            self._swap_dir = (
                directory if directory.is_absolute() else self._state_dir / directory
            )
            if self._swap.backend == "file":
                self._prepare_swap_dir()

        try:
            for spec in exports:
                if spec.name in self._static:
                    raise ExportError(errno.EINVAL, f"export {spec.name!r} is defined twice")
                self._static[spec.name] = self._open_static(spec)
                self._specs[spec.name] = spec
        except BaseException:
            self.close()
            raise

    # -- public -------------------------------------------------------------------------------

    def lookup(self, name: str) -> Export | None:
        """The export called ``name``, creating a node's swap export on first use.

        None means "no such export" (NBD_REP_ERR_UNKNOWN).  Raises ExportError when the export
        is valid but cannot be opened or created (disk full, size mismatch, ...).
        """
        if self._closed:
            raise ExportError(errno.ESHUTDOWN, "export registry is closed")
        export = self._static.get(name) if isinstance(name, str) else None
        if export is not None or self._swap is None:
            return export
        node = swap_node_from_name(name)
        if node is None:
            return None
        # Fast path without the lock: dict reads are atomic, and an Export is only published
        # into _nodes once it is fully built.
        export = self._nodes.get(node)
        if export is not None:
            return export
        with self._lock:
            if self._closed:
                raise ExportError(errno.ESHUTDOWN, "export registry is closed")
            export = self._nodes.get(node)
            if export is None:
                export = self._create_swap_export(node)
                self._nodes[node] = export
            return export

    def list(self) -> list[tuple[str, str]]:
        """(name, description) of static exports in config order, then swap exports by node.

        Swap exports listed are those open now plus, for file swap, images left on disk by a
        previous run (they will be reopened on connect, so they do exist for the client).
        """
        result = [(e.name, e.description) for e in self._static.values()]
        if self._swap is None:
            return result
        nodes = set(self._nodes)
        if self._swap.backend == "file":
            nodes.update(self._nodes_on_disk())
        result.extend(
            (SWAP_PREFIX + node, self._swap.description) for node in sorted(nodes)
        )
        return result

    def discard_swap_images(self) -> list[str]:
        """Empty every node's swap image on disk, keeping its size (swap.wipe, at start,
        before any node has opened one); return those nodes. Raises ExportError.

        Truncating to zero frees every block on any file system (hole punching is not
        everywhere); growing back leaves a sparse file of the old size, so the node's
        image still matches the template (or still mismatches, as before).
        """
        if self._swap is None or self._swap.backend != "file":
            return []
        nodes = sorted(self._nodes_on_disk())
        for node in nodes:
            path = self._image_path(node)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    size = os.fstat(fd).st_size
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise ExportError.wrap(f"wiping the swap image of node {node!r}", e) from e
        return nodes

    def swap_exports(self) -> dict[str, Export]:
        """Node name -> its open swap export; never opens or creates one (for metrics).

        Without the lock: it is held while a node's image is created, which is file I/O a
        scrape must not wait for. Copying a dict is atomic under the GIL, and an Export is
        only published into _nodes once it is fully built.
        """
        return dict(self._nodes)

    def open_exports(self) -> list[Export]:
        """Every export open now (static, then swap by node); never opens one (for metrics)."""
        static = list(self._static.values())
        return static + [export for _, export in sorted(self._nodes.items())]

    def reload(self, exports: Sequence[ExportSpec], swap: SwapTemplate | None) -> tuple[list, list]:
        """Serve a new set of static exports (a SIGHUP); return the names (added, removed).

        An export whose spec did not change keeps its Export, so its connections never
        notice. A changed one is replaced: new connections get the new one, open ones keep
        the old until they close. Removed exports stop taking new connections; their
        backends stay open for the connections still using them and close with the
        registry. If any new export cannot be opened, nothing changes (ExportError).
        The swap template's size and description apply to nodes opened from now on.
        """
        specs = {spec.name: spec for spec in exports}
        with self._lock:
            current, current_specs = dict(self._static), dict(self._specs)
        opened: dict[str, Export] = {}
        try:
            for name, spec in specs.items():
                if current_specs.get(name) != spec:
                    opened[name] = self._open_static(spec)
        except BaseException:
            for export in opened.values():
                export.backend.close()
            raise
        static = {name: opened.get(name) or current[name] for name in specs}
        removed = [name for name in current if static.get(name) is not current[name]]
        with self._lock:
            self._static, self._specs = static, specs
            self._retired.extend(current[name] for name in removed)
            if swap is not None and self._swap is not None:
                self._swap = swap
        return sorted(opened), sorted(removed)

    def close(self) -> None:
        """Flush and close every backend.  The server must have stopped all I/O first.

        The flush is not owed to NBD clients (only FLUSH and FUA promise durability), but a clean
        stop that leaves acknowledged writes only in the page cache would surprise an operator
        who powers the server off next.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            exports = [*self._static.values(), *self._retired, *self._nodes.values()]
        for export in exports:
            for step in (export.backend.flush, export.backend.close):
                try:
                    step()
                except OSError as e:  # keep going: the other exports still need closing
                    log.error("export %r: %s at close: %s", export.name, step.__name__, e)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- static exports -----------------------------------------------------------------------

    def _open_static(self, spec) -> Export:
        name = spec.name
        where = f"export {name!r}"
        if self._swap is not None and name.startswith(SWAP_PREFIX):
            raise ExportError(
                errno.EINVAL,
                f"{where}: names starting with {SWAP_PREFIX!r} belong to per-node swap",
            )
        try:
            if spec.backend == "file":
                if spec.path is None:
                    raise ExportError(errno.EINVAL, f"{where}: file backend needs a path")
                backend: Backend = FileBackend(
                    spec.path, spec.size, spec.read_only, create=not spec.read_only
                )
            elif spec.backend == "memory":
                if not spec.size:
                    raise ExportError(errno.EINVAL, f"{where}: memory backend needs a size")
                backend = MemoryBackend(spec.size, read_only=spec.read_only)
            else:
                raise ExportError(errno.EINVAL, f"{where}: unknown backend {spec.backend!r}")
        except (OSError, ValueError) as e:
            raise ExportError.wrap(where, e) from e
        return Export(
            name=name,
            description=spec.description,
            size=backend.size,
            read_only=spec.read_only,
            backend=backend,
            is_swap=False,
            node=None,
        )

    # -- per-node swap ------------------------------------------------------------------------

    def _prepare_swap_dir(self) -> None:
        try:
            # mkdir applies the umask; the explicit chmod makes it 0700 whatever the umask.
            self._swap_dir.mkdir(mode=0o700, parents=True)
            os.chmod(self._swap_dir, 0o700)
        except FileExistsError:
            if not self._swap_dir.is_dir():
                raise ExportError(errno.ENOTDIR, f"{self._swap_dir} is not a directory")
            # An operator-made directory is theirs to set up; say so if others can read swap.
            if self._swap_dir.stat().st_mode & 0o077:
                log.warning(
                    "swap directory %s is accessible to group/others; node swap holds secrets",
                    self._swap_dir,
                )
        except OSError as e:
            raise ExportError.wrap(f"swap directory {self._swap_dir}", e) from e
        self._swap_dir_resolved = self._swap_dir.resolve(strict=True)

    def _image_path(self, node: str) -> Path:
        path = self._swap_dir / f"{node}.img"
        # Belt and braces: the regex already excludes every way out of the directory.  This
        # check keeps it true if someone loosens the regex later.  (A symlink named
        # <node>.img would resolve elsewhere and fail here; O_NOFOLLOW also refuses it.)
        if path.resolve().parent != self._swap_dir_resolved:
            raise ExportError(
                errno.EPERM, f"swap image for node {node!r} resolves outside {self._swap_dir}"
            )
        return path

    def _create_swap_export(self, node: str) -> Export:
        size = self._swap.size
        try:
            path = self._image_path(node) if self._swap.backend == "file" else None
            backend = store.swap_image(path, size, self._swap.backend)
        except OSError as e:
            raise ExportError.wrap(f"swap export for node {node!r}", e) from e
        log.info("swap export for node %s ready: %r", node, backend)
        return Export(
            name=SWAP_PREFIX + node,
            description=self._swap.description,
            size=backend.size,
            read_only=False,
            backend=backend,
            is_swap=True,
            node=node,
        )

    def _nodes_on_disk(self) -> list[str]:
        try:
            names = os.listdir(self._swap_dir)
        except OSError:
            return []
        return [
            stem
            for stem, ext in (os.path.splitext(n) for n in names)
            if ext == ".img" and valid_node(stem)
        ]
