"""Every snippet runs (small sizes) and the Sphinx docs build with warnings as errors: neither can rot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = sorted((ROOT / "snippets").glob("*.py"))


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda p: p.name)
def test_snippet_runs(snippet, tmp_path):
    text = snippet.read_text()
    assert "# [setup]" in text and "# [end]" in text, f"{snippet.name}: needs # [setup] ... # [end] markers"
    env = {**os.environ, "QUANTSIM_SNIPPET_SMALL": "1", "QUANTSIM_SNIPPET_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(snippet)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{snippet.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "index.html").exists()
