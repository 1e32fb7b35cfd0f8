"""``photd demo`` as a newcomer runs it, on a machine kept busy on purpose."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import subprocess
import sys
from pathlib import Path


def _spin() -> None:
    while True:
        pass


def test_demo_on_a_loaded_machine_shows_the_processed_night_and_only_files_it_wrote(
        tmp_path: Path) -> None:
    # Every core busy with a spinning process: the daemon starts slowly, as on
    # the busy machine where the demo used to give up before the first frame.
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 2)]
    for h in hogs:
        h.start()
    try:
        out = subprocess.run([sys.executable, "-m", "photd", "demo", "--dir", str(tmp_path),
                              "--small", "--frames", "3"], capture_output=True, text=True,
                             timeout=900)
    finally:
        for h in hogs:
            h.kill()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    measured = re.search(r"photd demo: (\d+) science frames measured", out.stdout)
    assert measured and int(measured.group(1)) > 0, out.stdout[-2000:]
    named = re.findall(r"photd demo: (?:light-curve plot|CSV export) (\S+)", out.stdout)
    assert len(named) == 2, out.stdout[-2000:]
    for path in named:
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path
