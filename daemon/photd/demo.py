"""``photd demo``: a simulated night written live while the daemon processes it.

The daemon runs as a real separate process (``photd run``) watching the raw
folder while this process plays the three cameras (``--arrival``). At the end
the demo prints the frame states and the variable target's light curve, and
writes a plot.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from photd import reports
from photd.config import Config, load_config
from photd.simulate import TARGETS, SimOptions, load_truth, simulate_night
from photd.store import Store
from photd.workdir import store_path

ARRIVAL_S = 0.4


def _write_config(directory: Path) -> Path:
    cfg = directory / "demo-config.toml"
    cfg.write_text(
        "# photd demo configuration (written by photd demo)\n"
        "[paths]\n"
        f"watch = [{str(directory / 'raw')!r}]\n"
        f"work = {str(directory / 'work')!r}\n"
        f"catalog = {str(directory / 'catalog.ecsv')!r}\n"
        "[daemon]\n"
        "log_level = \"warning\"\n"
        "log_format = \"console\"\n"
        "rescan_interval_s = 5.0\n"
    )
    return cfg


def run_demo(directory: str | None = None, *, small: bool = True, seed: int = 1,
             frames: int = 10) -> int:
    """Simulate a night into ``directory`` (or a temporary folder) and process it live.

    Parameters
    ----------
    directory : str, optional
        Where the night, the work folder and the plot go.
    small : bool
        5x5-binned frames (fast); ``False`` for full-size 2536 x 3358 frames.
    seed : int
        Simulator seed.
    frames : int
        Science frames per target and band.
    """
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="photd-demo-"))
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "raw").mkdir(exist_ok=True)
    opts = SimOptions(seed=seed, small=small, science_per_target=frames)
    cfg = _write_config(root)
    print(f"photd demo: night in {root}")
    print(f"photd demo: starting the daemon (photd run --config {cfg.name})")
    t0 = time.perf_counter()
    # No --until-idle: on a busy machine the daemon could go idle before the
    # simulated cameras wrote their first frame. The demo knows when the night
    # is written and then asks the daemon (SIGUSR1) to finish and exit once idle.
    daemon = subprocess.Popen([sys.executable, "-m", "photd", "run", "--config", str(cfg)])
    try:
        n_exposures = [0]

        def progress(msg: str) -> None:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited with status {daemon.returncode} "
                                   "while the night was being written")
            if msg.startswith("simulate: exposure"):
                n_exposures[0] += 1
                if n_exposures[0] % 10 == 0:
                    print(f"photd demo: cameras have written {n_exposures[0]} exposures "
                          f"({time.perf_counter() - t0:.0f} s)")
            else:
                print("photd demo: " + msg.removeprefix("simulate: "))

        print(f"photd demo: three cameras write one exposure every {ARRIVAL_S} s "
              f"({'small' if small else 'full-size'} frames)")
        simulate_night(root, opts, arrival_s=ARRIVAL_S, progress=progress)
        print("photd demo: the night is written; the daemon finishes what is left")
        daemon.send_signal(signal.SIGUSR1)
        code = daemon.wait()
    except BaseException as exc:
        daemon.terminate()
        daemon.wait()
        if isinstance(exc, RuntimeError):
            print(f"photd demo: {exc}", file=sys.stderr)
            return 1
        raise
    elapsed = time.perf_counter() - t0
    if code != 0:
        print(f"photd demo: the daemon exited with status {code}", file=sys.stderr)
        return 1
    print(f"photd demo: night processed in {elapsed:.0f} s\n")
    return _summary(root, cfg)


def _compare_with_truth(cfg: Config, truth, target: str) -> None:
    """How far the measured calibrated magnitudes are from the simulator's truth."""
    store = Store.open_readonly(store_path(cfg.work_dir))
    with store:
        rows = store.lightcurve(target)
    fs = truth.frame_stars
    print(f"\n{target}: measured vs. true magnitude (simulator truth)")
    print("band  points  mean(mag - true)  rms(mag - true)  median error")
    for band in ("g", "r", "i"):
        diffs, errs = [], []
        for r in rows:
            if r["band"] != band or r["mag"] is None:
                continue
            sel = (fs["band"] == band) & (fs["frame"] == r["frame_number"]) & (fs["id"] == target)
            if sel.any():
                diffs.append(r["mag"] - float(fs["mag"][sel][0]))
                errs.append(r["mag_err"])
        if diffs:
            d = np.array(diffs)
            print(f"{band:<4}  {len(d):>6}  {d.mean():>+16.4f}  {d.std():>15.4f}  "
                  f"{np.median(errs):>12.4f}")


def _summary(root: Path, cfg_path: Path) -> int:
    """What ``photd status``, ``tail``, ``plot`` and ``export`` print for the night.

    Returns 1 when no science frame was measured: a demo that shows nothing
    must not look like a success.
    """
    cfg = load_config(cfg_path)
    reports.status(cfg)
    with Store.open_readonly(store_path(cfg.work_dir)) as store:
        n_done = store.counts().get("done", 0)
    if n_done == 0:
        print("photd demo: no science frame was measured; see the daemon's messages above",
              file=sys.stderr)
        return 1
    truth = load_truth(root)
    target = TARGETS[1].name
    print(f"\n{target} (r band): differential light curve vs. the simulator's truth")
    reports.tail(cfg, target, band="r", n=40)
    _compare_with_truth(cfg, truth, target)
    plot = root / f"{target}.png"
    csv = root / f"{target}_r.csv"
    written = []
    if reports.plot(cfg, target, output=str(plot)) == 0 and plot.is_file():
        written.append(f"light-curve plot {plot}")
    if reports.export(cfg, target, band="r", output=str(csv)) == 0 and csv.is_file():
        written.append(f"CSV export {csv}")
    print()
    for line in written:
        print(f"photd demo: {line}")
    print(f"photd demo: {n_done} science frames measured; the simulator's truth is in "
          f"{truth.root / 'truth'}")
    return 0
