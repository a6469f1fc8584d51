"""A short run of the coverage-guided fuzz target in CI (the long runs are by hand)."""

import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_nbd.py"


def test_fuzz_target_runs_clean_for_a_while(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sys.path.insert(0, str(FUZZ.parent))
    try:
        import fuzz_nbd
    finally:
        sys.path.pop(0)
    (corpus / "seed").write_bytes(fuzz_nbd.SEED)
    result = subprocess.run(
        [sys.executable, str(FUZZ), "-runs=300000", "-max_len=4096", str(corpus)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 300000 runs" in result.stderr, result.stderr[-2000:]
