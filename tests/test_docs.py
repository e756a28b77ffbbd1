"""The docs cannot drift from the code: their runnable blocks run here, as a reader would run them.

* every fenced block whose info string is ``bash runnable`` in README.md and docs/*.md runs, the
  blocks of one file in order in one working folder (later blocks use what earlier ones made);
* the Python block of docs/api.md (the front door, a whole cohort) runs as a saved script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(path: Path, info: str) -> list[str]:
    """The bodies of the fenced blocks of ``path`` whose info string is ``info``."""
    return [body for found, body in FENCE.findall(path.read_text()) if found.strip() == info]


def runnable_docs() -> list[Path]:
    return [p for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] if blocks(p, "bash runnable")]


def fresh_clone(tmp_path: Path) -> Path | None:
    """A clone of the repository's committed state, where a reader who just cloned it would stand
    (None outside a git checkout)."""
    if not (REPO / ".git").exists():
        return None
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True, timeout=120)
    return clone


@pytest.mark.slow
@pytest.mark.parametrize("doc", runnable_docs(), ids=lambda p: p.name)
def test_runnable_shell_blocks(doc, tmp_path):
    """The blocks run as a reader runs them: the README's from the root of a fresh clone, which
    they must leave with nothing untracked (their outputs are ignored); the others in a folder."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    where = (fresh_clone(tmp_path) if doc.name == "README.md" else None) or tmp_path
    for body in blocks(doc, "bash runnable"):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=where, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"{doc.name}:\n{body}\n--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}"
    for code in blocks(doc, "python") if doc.name == "README.md" else []:  # after the commands, as a reader would
        done = subprocess.run([sys.executable, "-c", code], cwd=where, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{doc.name}:\n{code}\n--- stderr\n{done.stderr[-3000:]}"
    if where != tmp_path:
        untracked = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True).stdout
        assert untracked == "", f"the README's commands left files in the clone:\n{untracked}"


def test_some_docs_have_runnable_blocks():
    assert {p.name for p in runnable_docs()} >= {"README.md"}


@pytest.mark.slow
def test_api_md_runs_a_whole_cohort(tmp_path):
    """docs/api.md's example saved as a script and run as ``python snip.py``, with no
    ``if __name__ == "__main__":`` guard, as a reader would paste it (the embedded cluster's
    workers must not import the script again)."""
    script = tmp_path / "snip.py"
    script.write_text(blocks(REPO / "docs" / "api.md", "python")[0])
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert "bootstrapping phase" not in done.stderr and "pooled AUC" in done.stdout
    assert sorted(p.name for p in (tmp_path / "heatmaps").glob("*.png"))[:1] == ["synth_000.png"]
    assert (tmp_path / "runs" / "mean" / "metrics.json").exists()
