"""Every command and format of README and DESIGN, run as a user types it.

One small night is simulated and processed through the command line once per
module (``photd simulate`` then ``photd run --until-idle``); every reading
command then runs as a subprocess on that work folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from aavso_spec import validate_aavso
from photd.headers import set_wcs

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ("target,band,frame,mjd,bjd_tdb,mag,mag_err,diff_mag,diff_mag_err,airmass,"
            "fwhm_arcsec,aperture_px,flags")
STATES = {"arrived", "waiting_log", "waiting_catalog", "queued", "processing", "calibration",
          "rejected", "done", "badfit", "failed"}


def photd(*args: str, cwd: Path, config: Path | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m photd ARGS`` in ``cwd``, with only ``config`` (if any) as configuration."""
    env = {k: v for k, v in os.environ.items() if k != "PHOTD_CONFIG"}
    if config is not None:
        env["PHOTD_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "photd", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class Night:
    """The processed night the tests share."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sim = root / "night"
        self.work = root / "work"

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return photd(*args, cwd=self.root, **kw)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Night:
    n = Night(tmp_path_factory.mktemp("cli"))
    sim = n.run("simulate", str(n.sim), "--small", "--frames", "4", "--seed", "5")
    assert sim.returncode == 0, sim.stderr
    assert sim.stdout.strip() == str(n.sim / "raw")
    run = n.run("run", "--watch", str(n.sim / "raw"), "--work", str(n.work), "--catalog",
                str(n.sim / "catalog.ecsv"), "--until-idle", "5", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return n


# ---------------------------------------------------------------- simulate, status


def test_simulate_writes_frames_log_catalog_and_truth(night):
    assert (night.sim / "raw" / "20161101.log").exists()
    assert len(list((night.sim / "raw" / "r").glob("*.fits"))) >= 8
    assert Table.read(night.sim / "catalog.ecsv").colnames[:3] == ["id", "ra", "dec"]
    assert (night.sim / "truth" / "night.json").exists()


def test_status_counts_the_states_and_names_the_frames_that_need_attention(night):
    out = night.run("status", "--work", str(night.work))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert re.match(r"\d+ frames: ", first) and "done" in first and "badfit" in first
    assert "double_exposure" in out.stdout  # a badfit frame, with its reason


def test_status_json_has_the_contract_shape(night):
    out = night.run("status", "--json", "--work", str(night.work))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"counts", "frames"}
    assert set(data["counts"]) <= STATES and sum(data["counts"].values()) == len(data["frames"])
    for f in data["frames"]:
        assert set(f) == {"path", "band", "state", "reason", "output"}
        assert f["state"] in STATES and Path(f["path"]).is_absolute()
        assert f["reason"] is None or isinstance(f["reason"], str)
        if f["state"] == "done":
            assert Path(f["output"]).exists()


# ---------------------------------------------------------------- tail


def test_tail_matches_the_name_without_case_or_spacing_and_separates_bands(night):
    out = night.run("tail", "oj 287", "--work", str(night.work))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OJ287: ")
    for band in "gri":
        assert f"== OJ287 {band}: " in out.stdout  # one table per band
    # The focus frame is never covered by the log: the tail says frames wait for it.
    assert re.search(r"\b3 frames wait for the observing log", out.stdout)
    assert "badfit (too_few_sources)" in out.stdout  # the clouded frame, without a point


def test_tail_of_one_band_shows_only_that_band(night):
    out = night.run("tail", "OJ287", "--band", "r", "--work", str(night.work))
    assert out.returncode == 0, out.stderr
    assert "== OJ287 r: " in out.stdout and "== OJ287 g" not in out.stdout
    rows = [line for line in out.stdout.splitlines() if re.match(r"\s+\d+ \d\d:\d\d:\d\d ", line)]
    assert len(rows) >= 2


def test_tail_of_an_unknown_target_lists_the_targets_and_bands(night):
    out = night.run("tail", "3C 273", "--work", str(night.work))
    assert out.returncode in (1, 2)
    assert "'3C 273' is not a target" in out.stderr
    assert "OJ287" in out.stderr and "PKS0235+164" in out.stderr and "g 3, r 3, i 3" in out.stderr
    bad_band = night.run("tail", "OJ287", "--band", "z", "--work", str(night.work))
    assert bad_band.returncode == 2 and "its bands: g, r, i" in bad_band.stderr


# ---------------------------------------------------------------- export


def test_export_csv_to_a_file_and_to_stdout_is_exactly_the_contract(night, tmp_path):
    out_file = tmp_path / "oj287_r.csv"
    to_file = night.run("export", "OJ287", "--band", "r", "--format", "csv", "-o",
                        str(out_file), "--work", str(night.work))
    assert to_file.returncode == 0, to_file.stderr
    to_stdout = night.run("export", "OJ287", "--band", "r", "--work", str(night.work))
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert out_file.read_text() == to_stdout.stdout
    lines = to_stdout.stdout.splitlines()
    assert lines[0] == CONTRACT
    rows = list(csv.DictReader(io.StringIO(to_stdout.stdout)))
    assert len(rows) == 3 and {r["band"] for r in rows} == {"r"}
    assert [int(r["frame"]) for r in rows] == [29, 30, 32]  # the observer's frame numbers


def test_export_ecsv_reads_back_with_astropy_times_units_and_integers(night, tmp_path):
    out_file = tmp_path / "oj287.ecsv"
    out = night.run("export", "OJ287", "--format", "ecsv", "-o", str(out_file),
                    "--work", str(night.work))
    assert out.returncode == 0, out.stderr
    table = Table.read(out_file, format="ascii.ecsv")
    assert table.colnames[:13] == CONTRACT.split(",")
    assert isinstance(table["mjd"], Time) and table["mjd"].scale == "utc"
    assert isinstance(table["bjd_tdb"], Time) and table["bjd_tdb"].scale == "tdb"
    # BJD - JD(UTC) is the light-travel time plus TDB-UTC: minutes, not days
    dt_s = (table["bjd_tdb"].jd - table["mjd"].jd) * 86400
    assert np.all(np.abs(dt_s) < 600)
    assert str(table["mag"].unit) == "mag" and str(table["aperture_px"].unit) == "pix"
    assert table["frame"].dtype.kind == "i" and table["flags"].dtype.kind == "i"
    assert all(c.startswith("F1-") for c in table["comparison"][0].split(";"))
    assert set(table.meta["check_stars"]) == {"g", "r", "i"}
    stdout = night.run("export", "OJ287", "--format", "ecsv", "--work", str(night.work))
    assert stdout.returncode == 0 and stdout.stdout == out_file.read_text()


def test_export_aavso_needs_an_observer_code_and_says_where_to_give_it(night):
    out = night.run("export", "OJ287", "--format", "aavso", "--work", str(night.work))
    assert out.returncode == 2
    assert "--observer-code" in out.stderr and "export.observer_code" in out.stderr


def test_export_aavso_of_all_bands_passes_the_spec_checks(night):
    out = night.run("export", "oj287", "--format", "aavso", "--observer-code", "XLOA",
                    "--work", str(night.work))
    assert out.returncode == 0, out.stderr
    problems, records = validate_aavso(out.stdout)
    assert problems == []
    assert len(records) == 9 and {r["FILTER"] for r in records} == {"SG", "SR", "SI"}
    assert {r["TRANS"] for r in records} == {"NO"} and {r["CNAME"] for r in records} == {
        "ENSEMBLE"}
    assert "#SOFTWARE=photd " in out.stdout
    groups: dict[str, set[str]] = {}
    for r in records:
        groups.setdefault(r["GROUP"], set()).add(r["FILTER"])
        assert re.search(r"\|COMPS=(F1-\d+ ?){2,}\|", r["NOTES"]), r["NOTES"]
        assert r["KNAME"].startswith("F1-") and float(r["KMAG"]) > 10
    assert groups == {"29": {"SG", "SR", "SI"}, "30": {"SG", "SR", "SI"},
                      "32": {"SG", "SR", "SI"}}


def test_the_check_star_is_chosen_the_same_way_every_time_and_recorded(night):
    a = night.run("export", "OJ287", "--format", "aavso", "--observer-code", "XLOA",
                  "--work", str(night.work))
    b = night.run("export", "OJ287", "--format", "aavso", "--observer-code", "XLOA",
                  "--work", str(night.work))
    assert a.stdout == b.stdout
    chosen = re.findall(r"^#photd check star (\w): (\S+) \((.+)\)$", a.stdout, re.M)
    assert [c[0] for c in chosen] == ["g", "r", "i"] and all(c[2] for c in chosen)


# ---------------------------------------------------------------- the README's own lines


def _readme_telescope_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Running it at the telescope", 1)[1].split("```")[1]
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_the_readmes_telescope_commands_run_as_written(night, tmp_path):
    """README's lines with its folders replaced by the test's; `run` is the fixture's
    and `--follow` would never end, so tail runs once."""
    cfg = tmp_path / "photd.toml"
    cfg.write_text('[export]\nobserver_code = "XLOA"\n')
    lines = _readme_telescope_lines()
    assert [shlex.split(x)[1] for x in lines] == ["run", "status", "tail", "export"]
    for line in lines[1:]:
        line = line.replace("/var/lib/photd", str(night.work)).replace("--follow", "")
        line = line.replace("-o oj287.txt", f"-o {tmp_path / 'oj287.txt'}")
        out = night.run(*shlex.split(line)[1:], config=cfg)
        assert out.returncode == 0, (line, out.stderr)
    problems, records = validate_aavso((tmp_path / "oj287.txt").read_text())
    assert problems == [] and {r["FILTER"] for r in records} == {"SR"}


def test_every_readme_command_is_a_command_of_photd(night):
    text = (ROOT / "README.md").read_text()
    block = text.split("## Commands", 1)[1].split("```")[1]
    commands = re.findall(r"^photd (\w+)", block, re.M)
    assert commands == ["demo", "simulate", "run", "status", "tail", "export", "plot"]
    for command in commands:
        out = night.run(command, "--help")
        assert out.returncode == 0 and f"usage: photd {command}" in out.stdout
    assert "--observer-code" in night.run("export", "--help").stdout


# ---------------------------------------------------------------- plot


def test_plot_writes_a_png_from_the_store_alone_quickly(night, tmp_path):
    png = tmp_path / "oj287.png"
    t0 = time.perf_counter()
    # No catalog in the configuration: the comparison curves come from the store.
    out = night.run("plot", "OJ 287", "-o", str(png), "--work", str(night.work))
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert elapsed < 30  # no online retries (they took ~6 s more before)
    one_band = night.run("plot", "PKS0235+164", "--band", "g", "-o", str(tmp_path / "p.png"),
                         "--work", str(night.work))
    assert one_band.returncode == 0, one_band.stderr


def test_plot_of_an_unknown_target_lists_the_targets(night, tmp_path):
    out = night.run("plot", "nothing", "-o", str(tmp_path / "x.png"), "--work", str(night.work))
    assert out.returncode in (1, 2) and "OJ287" in out.stderr
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- processed headers


def _corners(header: fits.Header) -> np.ndarray:
    nx, ny = header["NAXIS1"], header["NAXIS2"]
    return np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1]], float)


def test_processed_headers_hold_one_wcs_the_fitted_one(night):
    import sqlite3

    con = sqlite3.connect(night.work / "photd.sqlite")
    try:
        solved = con.execute("SELECT frames.output, solutions.header FROM frames JOIN solutions"
                             " ON solutions.frame_id = frames.id WHERE frames.state = 'done'"
                             " AND solutions.relative = 0").fetchall()
    finally:
        con.close()
    assert len(solved) >= 6
    for output, cards in solved:
        with fits.open(output) as hdul:
            hdul.verify("exception")  # the FITS standard, as astropy checks it
            header = hdul[0].header
        assert "CD1_1" not in header and "PC1_1" in header
        assert not [k for k in header if re.fullmatch(r"CD\d_\d|CROTA\d", k)]
        fitted = WCS(fits.Header(json.loads(cards)))
        corners = _corners(header)
        sky = fitted.all_pix2world(corners, 0)
        # What any reader of the file gets, against the solution the store kept.
        assert np.abs(WCS(header).all_world2pix(sky, 0) - corners).max() < 0.01
        assert any("first guess" in str(h) for h in header["HISTORY"])


def test_set_wcs_replaces_a_cd_guess_with_a_pc_fit():
    header = fits.Header()
    header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, 500, 600
    header["DATE-OBS"] = "2016-11-01T17:20:00.000"
    for k, v in {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 250.5, "CRPIX2": 300.5,
                 "CRVAL1": 133.70, "CRVAL2": 20.10, "CD1_1": -1.5e-4, "CD1_2": 0.0,
                 "CD2_1": 0.0, "CD2_2": 1.5e-4}.items():
        header[k] = v
    fit = WCS(naxis=2)
    fit.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    fit.wcs.crpix = [251.2, 299.0]
    fit.wcs.crval = [133.7036, 20.1085]
    theta = np.radians(0.4)
    fit.wcs.pc = 1.49e-4 * np.array([[-np.cos(theta), np.sin(theta)],
                                     [np.sin(theta), np.cos(theta)]])
    set_wcs(header, fit)
    assert "CD1_1" not in header and header["PC1_1"] == pytest.approx(fit.wcs.pc[0, 0])
    assert header["DATE-OBS"] == "2016-11-01T17:20:00.000"
    corners = _corners(header)
    sky = fit.all_pix2world(corners, 0)
    assert np.abs(WCS(header).all_world2pix(sky, 0) - corners).max() < 1e-6
    history = " ".join(str(h) for h in header["HISTORY"]).replace(" ", "")
    assert "CD1_1=-1.500000e-04" in history  # the guess is kept, under another name


def test_tail_marks_points_a_new_comparison_ensemble_revised(night, tmp_path):
    """What ``tail --follow`` shows after the daemon re-derives a curve with a new ensemble."""
    import sqlite3

    from photd import reports
    from photd.store import Store

    copy = tmp_path / "photd.sqlite"
    src, dst = sqlite3.connect(night.work / "photd.sqlite"), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    shown: dict[int, str] = {}
    with Store.open_readonly(copy) as store:
        before, n = reports._tail_text(store, "OJ287", None, 15, shown)
    assert n == 9 and "revised" not in before
    dst.execute("UPDATE lightcurve SET ensemble_version = 'new' WHERE band = 'r'")
    dst.commit()
    dst.close()
    with Store.open_readonly(copy) as store:
        after, _n = reports._tail_text(store, "OJ287", None, 15, shown)
    assert "3 points revised by a new comparison ensemble" in after
    assert sum(line.endswith("revised") for line in after.splitlines()) == 3
