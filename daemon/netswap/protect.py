"""Keeping netswapd itself out of the reclaim it exists to serve.

When a node swaps to netswapd and this server is short of memory too, three things could stall
or kill the daemon, each with its own defence, applied once at start by protect_process():

- Its own pages being reclaimed: a page fault in the daemon then waits for I/O while swap
  requests wait for the daemon. mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) keeps every
  page it has, and every page it will touch, in RAM. MCL_ONFAULT locks pages as they are first
  touched instead of populating every mapping at once, so reserved-but-unused address space
  (thread stacks, allocator arenas) costs nothing. Needs CAP_IPC_LOCK or a large enough
  RLIMIT_MEMLOCK.
- The OOM killer choosing it: oom_score_adj (-1000 exempts it). Lowering the value below what
  the process started with needs CAP_SYS_RESOURCE; systemd's OOMScoreAdjust= sets it before
  exec, without the daemon needing the capability.
- Its allocations recursing into I/O: with PR_SET_IO_FLUSHER the kernel allocates for it as if
  GFP_NOIO (reclaim never waits on I/O, which could be I/O to a device backed by this very
  daemon) and throttles it only against its own writes. Needs CAP_SYS_RESOURCE. The flag is
  per thread and inherited by threads created after it is set, so protect_process must run
  before the daemon starts its threads.

Each of mlockall and io_flusher has a mode: "off" skips the step, "best-effort" records a
failure in the report (with what to grant) and carries on, "required" raises ProtectError.
A failure to set oom_score_adj is always recorded and never fatal: there is no mode for it,
and a daemon the OOM killer could pick is still better than no daemon.

Public API:
    protect_process(config) -> ProtectionReport      config: .mlockall .oom_score_adj .io_flusher
    ProtectionReport(mlockall, oom_score_adj, io_flusher, problems), .summary()
    ProtectError
"""

from __future__ import annotations

import ctypes
import os
import errno
import logging
import resource
import threading
from dataclasses import dataclass, field

log = logging.getLogger("netswap.protect")

MODES = ("required", "best-effort", "off")

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
OOM_SCORE_ADJ = "/proc/self/oom_score_adj"

_GRANT_SYS_RESOURCE = "grant CAP_SYS_RESOURCE (AmbientCapabilities=CAP_SYS_RESOURCE in the unit)"
_GRANT_IPC_LOCK = ("LimitMEMLOCK=infinity in the unit, or grant CAP_IPC_LOCK "
                   "(AmbientCapabilities=CAP_IPC_LOCK)")


class ProtectError(Exception):
    """A step whose mode is "required" failed; the message says what to grant."""


@dataclass
class ProtectionReport:
    """What protect_process achieved, for the startup log, metrics and `netswapd reserve`."""

    mlockall: bool = False  # all memory locked, now and future
    oom_score_adj: int | None = None  # the value in effect, None if not set
    io_flusher: bool = False  # PR_SET_IO_FLUSHER set and confirmed
    problems: list[str] = field(default_factory=list)  # "STEP: ERRNO: what to grant"

    def summary(self) -> str:
        """One line: each protection and whether it holds."""
        oom = "unchanged" if self.oom_score_adj is None else str(self.oom_score_adj)
        text = (f"mlockall {'on' if self.mlockall else 'off'}, oom_score_adj {oom}, "
                f"io_flusher {'on' if self.io_flusher else 'off'}")
        return f"{text} ({'; '.join(self.problems)})" if self.problems else text


class _StepFailed(Exception):
    pass


def _libc():
    # use_errno: ctypes saves errno right after each call, before Python can clobber it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlockall.argtypes = [ctypes.c_int]
    libc.mlockall.restype = ctypes.c_int
    # All five arguments declared as unsigned long, so that unused ones are passed as real
    # zeros: prctl rejects PR_SET_IO_FLUSHER with EINVAL when arguments 3-5 are not 0, and
    # undeclared varargs would leave whatever the registers held.
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl.restype = ctypes.c_int
    return libc


def _failure(step: str, error_number: int, advice: str) -> _StepFailed:
    name = errno.errorcode.get(error_number, str(error_number))
    return _StepFailed(f"{step}: {name}: {advice}")


def _lock_all_memory(libc) -> None:
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return
    error_number = ctypes.get_errno()
    if error_number in (errno.ENOMEM, errno.EPERM):
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
        advice = f"more than RLIMIT_MEMLOCK ({shown}) to lock: {_GRANT_IPC_LOCK}"
    elif error_number == errno.EINVAL:
        advice = "the kernel lacks MCL_ONFAULT (Linux 4.4)"
    else:
        advice = "some memory could not be locked"
    raise _failure("mlockall", error_number, advice)


def _set_oom_score_adj(value: int) -> int:
    try:
        with open(OOM_SCORE_ADJ, "w") as f:
            f.write(str(value))
        with open(OOM_SCORE_ADJ) as f:
            return int(f.read())
    except OSError as e:
        if e.errno == errno.EACCES:
            advice = (f"lowering it needs CAP_SYS_RESOURCE: set OOMScoreAdjust={value} in the "
                      f"unit, or {_GRANT_SYS_RESOURCE}")
        else:
            advice = e.strerror
        raise _failure(f"oom_score_adj={value}", e.errno, advice) from None


def _become_io_flusher(libc) -> None:
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        error_number = ctypes.get_errno()
        if error_number == errno.EPERM:
            advice = _GRANT_SYS_RESOURCE
        elif error_number == errno.EINVAL:
            advice = "the kernel lacks PR_SET_IO_FLUSHER (Linux 5.6)"
        else:
            advice = "the kernel refused it"
        raise _failure("PR_SET_IO_FLUSHER", error_number, advice)
    # Read back: a set that "succeeds" but does not hold would be the worst failure, silent.
    state = libc.prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0)
    if state != 1:
        error_number = ctypes.get_errno() if state < 0 else errno.EINVAL
        raise _failure("PR_SET_IO_FLUSHER", error_number,
                       f"set, but PR_GET_IO_FLUSHER reports {state}")
    if threading.active_count() > 1:
        # The flag is per thread: these threads run without it.
        log.warning("PR_SET_IO_FLUSHER set after %d other threads started; they do not have "
                    "it", threading.active_count() - 1)


def _check_config(config) -> None:
    for name in ("mlockall", "io_flusher"):
        mode = getattr(config, name)
        if mode not in MODES:
            raise ValueError(f"protect.{name} = {mode!r}: expected one of {', '.join(MODES)}")
    adj = config.oom_score_adj
    if adj is not None and not (isinstance(adj, int) and -1000 <= adj <= 1000):
        raise ValueError(f"protect.oom_score_adj = {adj!r}: expected -1000..1000")


def protect_process(config) -> ProtectionReport:
    """Apply config's protections to this process; see the module docstring.

    config: anything with .mlockall and .io_flusher ("required" | "best-effort" | "off") and
    .oom_score_adj (-1000..1000, or None to leave it alone), such as a ProtectConfig. Call it
    from the main thread before any other thread starts. Raises ProtectError when a
    "required" step fails (the steps before it stay applied) and ValueError for a config
    it does not understand, before changing anything.
    """
    _check_config(config)
    report = ProtectionReport()
    libc = _libc()

    def attempt(mode: str, step) -> bool:
        try:
            step()
        except _StepFailed as failure:
            if mode == "required":
                raise ProtectError(str(failure)) from None
            report.problems.append(str(failure))
            log.warning("self-protection: %s", failure)
            return False
        return True

    # The OOM score first: it costs nothing and covers the rest of the start-up.
    if config.oom_score_adj is not None:
        def set_adj():
            report.oom_score_adj = _set_oom_score_adj(config.oom_score_adj)

        attempt("best-effort", set_adj)
    if config.mlockall != "off":
        report.mlockall = attempt(config.mlockall, lambda: _lock_all_memory(libc))
    if config.io_flusher != "off":
        report.io_flusher = attempt(config.io_flusher, lambda: _become_io_flusher(libc))
    log.info("self-protection: %s", report.summary())
    return report


# -- the scheduler: a swap connection's thread is woken first ------------------------------

SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(os.uname().machine)
# The shortest slice EEVDF accepts (Linux 6.12+ takes sched_attr.sched_runtime as the slice
# of a SCHED_OTHER thread; it clamps to 0.1..100 ms).
SWAP_THREAD_SLICE_NS = 100_000
_slice_warned = threading.Event()


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
                ("sched_util_min", ctypes.c_uint32), ("sched_util_max", ctypes.c_uint32)]


def shorten_slice() -> bool:
    """Give the calling thread (a swap connection's reader) the shortest scheduler slice.

    A node's page fault waits on this thread. When the CPUs are busy (another node's storm:
    its client, our threads serving it, writeback), a woken thread with the default slice
    (~3 ms here) waits for the running one's slice to end; EEVDF lets a thread with a
    shorter slice preempt at wakeup. Measured (tests/daemon/test_fairness.py, uncapped fsync storm):
    the quiet node's p99 during the storm fell from 0.9-1.8 ms to 0.5-1.0 ms. The thread
    still gets its fair share of CPU, in smaller pieces. Needs no privilege; False (and one
    log line per process) where the kernel or architecture does not have it.
    """
    if SYS_SCHED_SETATTR is None:
        return False
    attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_runtime=SWAP_THREAD_SLICE_NS)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0:
        return True
    if not _slice_warned.is_set():
        _slice_warned.set()
        error = ctypes.get_errno()
        log.info("a short scheduler slice for swap threads is not available (sched_setattr: "
                 "%s); they run with the default slice", errno.errorcode.get(error, error))
    return False
