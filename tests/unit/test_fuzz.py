"""A short run of the coverage-guided fuzz target in CI (the long runs are by hand)."""

import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_nbd.py"


def import_target():
    sys.path.insert(0, str(FUZZ.parent))
    try:
        import fuzz_nbd
    finally:
        sys.path.pop(0)
    return fuzz_nbd


def test_the_seeds_reach_the_requests_they_are_for():
    """A seed the handshake refuses, or whose requests check_request refuses, would start
    the fuzzer far from what it is there for."""
    fuzz_nbd = import_target()
    C = fuzz_nbd.C
    assert fuzz_nbd.one_input(fuzz_nbd.SEEDS["go_read"]) == [("read", 0, 0)]
    assert fuzz_nbd.one_input(fuzz_nbd.SEEDS["block_status"]) == [
        ("block_status", 0, 0), ("block_status", C.CMD_FLAG_REQ_ONE, 0),
        ("write_zeroes", C.CMD_FLAG_FAST_ZERO | C.CMD_FLAG_NO_HOLE, 0)]


def test_fuzz_target_runs_clean_for_a_while(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    fuzz_nbd = import_target()
    for name, seed in fuzz_nbd.SEEDS.items():
        (corpus / name).write_bytes(seed)
    result = subprocess.run(
        [sys.executable, str(FUZZ), "-runs=300000", "-max_len=4096", str(corpus)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 300000 runs" in result.stderr, result.stderr[-2000:]
