"""What the journal receives from a real ``photd run``: priorities and JSON lines only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _run_into_journal_file(tmp_path: Path, *args: str) -> list[str]:
    """Run photd with standard error on a file that $JOURNAL_STREAM names (as systemd does)."""
    err_path = tmp_path / "journal.txt"
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-m", "photd", *args], stderr=err,
                       stdout=subprocess.DEVNULL, env=env, timeout=300, check=False)
    return err_path.read_text().splitlines()


def test_journal_lines_carry_syslog_priorities_and_stay_json(tmp_path: Path) -> None:
    watch = tmp_path / "raw" / "g"
    watch.mkdir(parents=True)
    (watch / "junk_0001.fits").write_bytes(b"this is not a FITS file" * 200)
    lines = _run_into_journal_file(tmp_path, "run", "--watch", str(watch), "--work",
                                   str(tmp_path / "work"), "--until-idle", "1")
    assert lines, "photd wrote nothing"
    events = []
    for line in lines:
        assert line[:1] == "<" and line[2] == ">", line
        events.append((int(line[1]), json.loads(line[3:])))
    by_event = {e["event"]: prio for prio, e in events}
    assert by_event["photd started"] == 6
    assert by_event["frame failed"] == 4  # journalctl -p warning finds it
    failed = next(e for _p, e in events if e["event"] == "frame failed")
    assert failed["reason"] == "not_fits"


def test_without_the_journal_lines_are_plain_json(tmp_path: Path) -> None:
    watch = tmp_path / "raw"
    watch.mkdir()
    out = subprocess.run([sys.executable, "-m", "photd", "run", "--watch", str(watch),
                          "--work", str(tmp_path / "work"), "--until-idle", "1"],
                         capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    assert out.returncode == 0, out.stderr
    for line in out.stderr.splitlines():
        assert json.loads(line)["event"]


def test_library_messages_go_through_the_same_renderer(tmp_path: Path) -> None:
    code = ("import logging, sys; from photd.logs import configure; "
            "configure('info', 'json'); "
            "logging.getLogger('apscheduler.scheduler').warning('Run time of job was missed'); "
            "logging.getLogger('apscheduler.scheduler').info('Added job')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, lines  # INFO chatter of libraries stays out
    event = json.loads(lines[0])
    assert event["event"] == "Run time of job was missed"
    assert event["level"] == "warning" and event["logger"] == "apscheduler.scheduler"
