"""One progress helper: a tqdm bar in a terminal, plain periodic lines in a log."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from nic_pipeline.runtime.progress import PlainProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("NIC_PROGRESS", raising=False)
    monkeypatch.delenv("NIC_PROGRESS_INTERVAL", raising=False)


def test_a_log_gets_one_plain_line_per_tenth_and_no_escapes():
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc="slides", unit="slide", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert 10 <= len(lines) <= 11, lines  # a line per 10 %, and the final one
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[0].startswith("slides: 100/1,000 slide (10 %)")
    assert lines[-1].startswith("slides: 1,000/1,000 slide (100 %)") and "in all" in lines[-1]
    percents = [int(line.split("(")[1].split(" %")[0]) for line in lines]
    assert percents == sorted(percents)


def test_a_terminal_gets_a_tqdm_bar():
    term = Terminal()
    with progress_bar(total=50, desc="steps", file=term) as bar:
        for _ in range(50):
            bar.update(1)
    assert "\r" in term.getvalue() and "50/50" in term.getvalue()
    assert not isinstance(bar, PlainProgress)


def test_a_growing_total_never_shows_a_percentage(monkeypatch):
    log = io.StringIO()
    bar = progress_bar(total=0, desc="patches", unit="patch", growing=True, file=log, interval=0)
    for found in (300, 700, 1000):  # tissue found in three slides, one after another
        bar.total += found
        bar.update(found // 2)
    bar.close()
    text = log.getvalue()
    *running, last = text.splitlines()
    assert "%" not in "".join(running)
    assert running[0].startswith("patches: 150 of 300 found so far")
    assert running[-1].startswith("patches: 1,000 of 2,000 found so far")
    assert last.startswith("patches: 1,000/2,000 patch (50 %)") and "in all" in last
    term = Terminal()
    with progress_bar(total=10, desc="patches", unit="patch", growing=True, file=term) as bar:
        bar.update(3)
    assert "%" not in term.getvalue() and "found so far" in term.getvalue()


def test_transient_loops_write_only_on_the_interval_and_the_override_wins(monkeypatch):
    log = io.StringIO()
    for _ in progress_bar(range(100), leave=False, file=log):
        pass
    assert log.getvalue() == ""  # quick and transient: nothing in the log
    monkeypatch.setenv("NIC_PROGRESS", "plain")
    term = Terminal()
    with progress_bar(total=4, desc="tasks", file=term) as bar:
        bar.set_postfix(tasks="1/4")
        bar.update(4)
    first, last = term.getvalue().splitlines()
    assert first.startswith("tasks: 4/4 it (100 %)") and first.endswith("elapsed, tasks=1/4")
    assert last.endswith("in all, tasks=1/4")
    monkeypatch.setenv("NIC_PROGRESS", "off")
    log = io.StringIO()
    for _ in progress_bar(range(10), file=log):
        pass
    assert log.getvalue() == ""


@pytest.mark.slow  # 25-60 s on a loaded 2-core machine
def test_a_compression_logged_to_a_file_has_plain_lines_that_never_go_back(tmp_path):
    """The real `nic synth` + `nic compress`, their output in a file as under SLURM or nohup."""
    nic = [sys.executable, "-c", "from nic_pipeline.cli import main; main()"]
    env = {k: v for k, v in os.environ.items() if k not in ("NIC_PROGRESS",)} | {"NIC_PROGRESS_INTERVAL": "0.01"}
    log = tmp_path / "job.log"
    with log.open("w") as out:
        for args in (["synth", "c", "--slides", "2", "--width", "1024", "--height", "1024"],
                     ["compress", "c", "--out", "c.zarr", "--workers", "1"]):
            subprocess.run(nic + args, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env, check=True,
                           timeout=300)
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    patches = [line for line in text.splitlines() if line.startswith("patches: ")]
    slides = [line for line in text.splitlines() if line.startswith("slides: ")]
    assert patches and slides
    assert all("%" not in line for line in patches if "in all" not in line)  # total still growing
    done = [int(line.split()[1].split("/")[0].replace(",", "")) for line in patches]
    assert done == sorted(done)
    assert "2/2 slide (100 %)" in slides[-1]
