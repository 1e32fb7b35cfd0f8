"""The configuration: documented defaults, and errors that name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from photd import config as c

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"site": c.SiteConfig, "detector": c.DetectorConfig, "paths": c.PathsConfig,
            "daemon": c.DaemonConfig, "obslog": c.ObslogConfig, "output": c.OutputConfig,
            "export": c.ExportConfig,
            "calibration": c.CalibrationConfig, "catalog": c.CatalogConfig,
            "astrometry": c.AstrometryConfig, "photometry": c.PhotometryConfig}


def test_config_toml_documents_every_key_with_its_default():
    doc = tomllib.loads((ROOT / "config.toml").read_text())
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name in doc[name], f"config.toml lacks {name}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = doc[name][f.name]
            if isinstance(default, tuple):
                value = tuple(value)
            assert value == default, f"{name}.{f.name}: file says {value!r}, code {default!r}"
    assert c.load_config(ROOT / "config.toml") == dataclasses.replace(
        c.Config(), source=str(ROOT / "config.toml"))


@pytest.mark.parametrize("text, key", [
    ("[daemon]\nworkers = -1\n", "daemon.workers"),
    ("[daemon]\nobserver = \"fanotify\"\n", "daemon.observer"),
    ("[detector]\npixel_scale_arcsec = \"0.107\"\n", "detector.pixel_scale_arcsec"),
    ("[site]\nlatitude = 40.4\n", "site.latitude"),
    ("[cameras.g]\nband = \"z\"\n", "cameras.g.band"),
    ("[paths\nwork = 1\n", "config.toml"),
])
def test_bad_configuration_exits_2_naming_the_key(tmp_path, text, key):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    out = subprocess.run([sys.executable, "-m", "photd.cli", "status", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert key in out.stderr, out.stderr


def test_command_line_overrides_the_file(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[paths]\nwork = \"from-file\"\n")
    out = subprocess.run([sys.executable, "-m", "photd.cli", "status", "--config", str(cfg),
                          "--work", str(tmp_path / "from-flag")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "from-flag" in out.stderr
