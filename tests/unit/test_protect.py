"""Self-protection, each case in a child process: mlockall would lock the test runner's
memory, and the OOM score and the IO_FLUSHER flag cannot be taken back without privileges.

The child applies protect_process and reports what the kernel then says about it
(/proc/self/status VmLck, /proc/self/oom_score_adj). Cases without a capability drop it
from the child's bounding set with setpriv, so they hold whether or not the runner has it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from netswap import protect
from netswap.protect import ProtectionReport, protect_process

MiB = 1 << 20

CHILD = textwrap.dedent("""
    import dataclasses, json, mmap, resource, sys
    from types import SimpleNamespace
    from netswap.protect import ProtectError, protect_process

    def status_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    arguments = json.loads(sys.argv[1])
    if arguments.get("memlock_limit") is not None:
        limit = arguments["memlock_limit"]
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
    result = {"oom_score_adj_before": int(open("/proc/self/oom_score_adj").read())}
    try:
        report = protect_process(SimpleNamespace(**arguments["config"]))
        result["report"] = dataclasses.asdict(report)
    except ProtectError as e:
        result["error"] = str(e)
    result["vmlck_kib"] = status_kib("VmLck")
    # MCL_FUTURE: memory mapped after the call is locked too.
    area = mmap.mmap(-1, 16 << 20)
    result["vmlck_after_mmap_kib"] = status_kib("VmLck")
    result["oom_score_adj"] = int(open("/proc/self/oom_score_adj").read())
    print(json.dumps(result))
""")


def run_child(config: dict, *, drop: tuple[str, ...] = (), memlock_limit: int | None = None
              ) -> dict:
    command = [sys.executable, "-c", CHILD,
               json.dumps({"config": config, "memlock_limit": memlock_limit})]
    if drop:
        command = ["setpriv", f"--bounding-set={','.join('-' + cap for cap in drop)}",
                   *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def config(mlockall="off", oom_score_adj=None, io_flusher="off") -> dict:
    return {"mlockall": mlockall, "oom_score_adj": oom_score_adj, "io_flusher": io_flusher}


def test_io_flusher_best_effort_without_cap_sys_resource_reports_eperm():
    child = run_child(config(io_flusher="best-effort"), drop=("sys_resource",))
    report = child["report"]
    assert report["io_flusher"] is False
    (problem,) = report["problems"]
    assert problem.startswith("PR_SET_IO_FLUSHER: EPERM: grant CAP_SYS_RESOURCE")
    assert "AmbientCapabilities" in problem


def test_io_flusher_required_without_cap_sys_resource_refuses():
    child = run_child(config(mlockall="best-effort", io_flusher="required"),
                      drop=("sys_resource",))
    assert "report" not in child
    assert child["error"].startswith("PR_SET_IO_FLUSHER: EPERM: grant CAP_SYS_RESOURCE")
    assert child["vmlck_kib"] > 0  # the steps before the failing one stay applied


def test_mlockall_locks_current_and_future_memory():
    child = run_child(config(mlockall="required"))
    assert child["report"]["mlockall"] is True
    assert child["vmlck_kib"] > 0
    # MCL_ONFAULT: the new 16 MiB mapping counts as locked although none of it was touched.
    assert child["vmlck_after_mmap_kib"] - child["vmlck_kib"] >= 16 * 1024


def test_mlockall_over_the_memlock_limit_without_cap_ipc_lock():
    limit = 64 * 1024  # far below what a Python process has mapped
    child = run_child(config(mlockall="best-effort"), drop=("ipc_lock",), memlock_limit=limit)
    report = child["report"]
    assert report["mlockall"] is False and child["vmlck_kib"] == 0
    (problem,) = report["problems"]
    assert problem.startswith("mlockall: ENOMEM: more than RLIMIT_MEMLOCK (65536 bytes)")
    assert "LimitMEMLOCK=infinity" in problem and "CAP_IPC_LOCK" in problem

    child = run_child(config(mlockall="required"), drop=("ipc_lock",), memlock_limit=limit)
    assert child["error"] == problem


def test_oom_score_adj_is_applied():
    child = run_child(config(oom_score_adj=500))
    assert child["report"] == {"mlockall": False, "oom_score_adj": 500, "io_flusher": False,
                               "problems": []}
    assert child["oom_score_adj"] == 500


def test_oom_score_adj_below_the_floor_without_cap_sys_resource_is_reported():
    if int(Path("/proc/self/oom_score_adj").read_text()) == -1000:
        pytest.skip("the runner already runs at -1000: lowering cannot be refused")
    child = run_child(config(oom_score_adj=-1000, io_flusher="off"), drop=("sys_resource",))
    report = child["report"]
    assert report["oom_score_adj"] is None
    assert child["oom_score_adj"] == child["oom_score_adj_before"]
    (problem,) = report["problems"]
    assert problem.startswith("oom_score_adj=-1000: EACCES: lowering it needs CAP_SYS_RESOURCE")
    assert "OOMScoreAdjust=-1000" in problem


def test_off_touches_nothing():
    child = run_child(config(mlockall="off", oom_score_adj=None, io_flusher="off"),
                      drop=("sys_resource",))  # so that an attempted prctl would be reported
    assert child["report"] == {"mlockall": False, "oom_score_adj": None, "io_flusher": False,
                               "problems": []}
    assert child["vmlck_kib"] == 0 and child["vmlck_after_mmap_kib"] == 0
    assert child["oom_score_adj"] == child["oom_score_adj_before"]


def test_a_config_it_does_not_understand_is_refused_before_anything_changes():
    # In this process: the check comes before any step, so nothing is locked or changed.
    with pytest.raises(ValueError, match="protect.mlockall = 'always'"):
        protect_process(SimpleNamespace(mlockall="always", oom_score_adj=0, io_flusher="off"))
    with pytest.raises(ValueError, match="protect.oom_score_adj = 2000"):
        protect_process(SimpleNamespace(mlockall="off", oom_score_adj=2000, io_flusher="off"))


def test_report_summary():
    assert ProtectionReport(True, -1000, True).summary() == \
        "mlockall on, oom_score_adj -1000, io_flusher on"
    report = ProtectionReport(True, None, False, ["PR_SET_IO_FLUSHER: EPERM: grant X"])
    assert report.summary() == ("mlockall on, oom_score_adj unchanged, io_flusher off "
                                "(PR_SET_IO_FLUSHER: EPERM: grant X)")



def test_a_swap_thread_gets_the_shortest_scheduler_slice():
    def slice_ns() -> int:
        for line in open("/proc/thread-self/sched"):
            if line.startswith("se.slice"):
                return int(line.split(":")[1])
        pytest.skip("this kernel does not show se.slice")

    seen = {}

    def thread():
        seen["before"] = slice_ns()
        seen["set"] = protect.shorten_slice()
        seen["after"] = slice_ns()

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    if not seen["set"]:
        pytest.skip("sched_setattr with a slice is not available here")
    assert seen["after"] == protect.SWAP_THREAD_SLICE_NS < seen["before"]
    assert slice_ns() == seen["before"]  # the calling thread only
