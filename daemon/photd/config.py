"""Configuration: ``config.toml`` read once into frozen dataclasses.

Every key has a documented default (see ``config.toml`` in the repository).
A wrong key, a wrong type or a value outside its allowed range raises
:class:`ConfigError` naming the key, so ``photd`` can exit with status 2.
No other module reads the file or the environment.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BANDS = ("g", "r", "i")


class ConfigError(ValueError):
    """A configuration key is missing, unknown or has an invalid value."""


@dataclass(frozen=True)
class SiteConfig:
    """Observatory site (defaults: Xinglong Observatory, paper Table 2)."""

    name: str = "Xinglong Observatory"
    latitude_deg: float = 40.395833  # +40:23:45
    longitude_deg: float = 117.577222  # 117:34:38 E
    elevation_m: float = 960.0
    utc_offset_h: float = 8.0  # local time used only to name the night


@dataclass(frozen=True)
class DetectorConfig:
    """Detector geometry shared by the three cameras (unbinned pixels)."""

    width_px: int = 2536
    height_px: int = 3358
    # The paper quotes 0.117"/px but its 4.51' x 5.98' field implies 0.107.
    pixel_scale_arcsec: float = 0.107
    rotation_deg: float = 0.0  # position angle of the detector +y axis, east of north
    east_left: bool = True  # standard orientation: RA increases to the left (-x)
    frame_number_key: str = "FRAMENUM"
    binning_keys: tuple[str, ...] = ("XBINNING", "CCDXBIN", "BINX")


@dataclass(frozen=True)
class CameraConfig:
    """Per-camera (per-band) settings."""

    band: str = "r"
    folder: str = ""  # watched sub-folder for this camera; "" = infer from folder or name
    saturation_adu: float = 65000.0
    nonlinearity_adu: float = 60000.0
    dark_current_e_per_s: float = 0.1  # paper: below 0.1 e-/px/s darks are negligible
    overscan: str = ""  # FITS section e.g. "[2537:2560,1:3358]"; "" = none
    trim: str = ""  # FITS section to keep; "" = whole frame


@dataclass(frozen=True)
class PathsConfig:
    """Where photd reads and writes."""

    watch: tuple[str, ...] = ()
    work: str = "photd-work"
    catalog: str = ""  # local reference catalog file; "" = online services via cache


@dataclass(frozen=True)
class DaemonConfig:
    """Behaviour of ``photd run``."""

    workers: int = 0  # 0 = number of cores
    observer: str = "inotify"  # "inotify" (native events) or "polling" (network shares)
    poll_interval_s: float = 2.0
    rescan_interval_s: float = 30.0
    settle_s: float = 0.5  # a file unchanged this long with a full size is complete
    truncated_timeout_s: float = 120.0
    min_free_disk_mb: float = 1024.0
    log_level: str = "info"
    log_format: str = "auto"  # "auto" (console on a TTY, JSON otherwise), "json", "console"
    # A backlog of one series re-derives its light curve at most this often (s);
    # a frame arriving alone gets its light-curve row at once.
    lightcurve_interval_s: float = 10.0


@dataclass(frozen=True)
class ObslogConfig:
    """How the observing log is found and read."""

    name_glob: str = "*.log"
    encodings: tuple[str, ...] = ("utf-8-sig", "gb18030")


@dataclass(frozen=True)
class OutputConfig:
    """Processed-frame storage."""

    compress: bool = False  # Rice tile compression of the stored copies (lossless)


@dataclass(frozen=True)
class ExportConfig:
    """What ``photd export`` writes into reports."""

    # AAVSO observer code (#OBSCODE of an AAVSO Extended report); "" = give
    # --observer-code on the command line.
    observer_code: str = ""


@dataclass(frozen=True)
class CalibrationConfig:
    """Master calibration building and selection."""

    max_master_age_days: float = 30.0
    flat_min_adu: float = 5000.0
    flat_max_adu: float = 50000.0
    combine_sigma: float = 3.0
    memory_limit_mb: float = 512.0
    # A bias or dark this far (ADU) from the night's others has a light leak
    # or a bad readout; the simulator's bias level wanders by ~0.3 ADU.
    outlier_level_adu: float = 20.0
    # More saturated pixels than this (fraction) rejects a calibration frame.
    max_saturated_fraction: float = 0.001


@dataclass(frozen=True)
class CatalogConfig:
    """Reference catalogs."""

    cache_dir: str = ""  # "" = <work>/catalog-cache
    timeout_s: float = 20.0
    retries: int = 3
    radius_arcmin: float = 6.0
    max_mag: float = 21.0
    tile_deg: float = 0.25  # online cones are cached per sky tile of this size
    backoff_s: float = 2.0  # first retry delay; doubles on each retry
    retry_after_s: float = 600.0  # after a failed query, do not ask again for this long


@dataclass(frozen=True)
class AstrometryConfig:
    """Source detection, matching and the quality gate."""

    detect_sigma: float = 5.0
    min_matches: int = 6
    max_rms_arcsec: float = 0.5
    scale_tolerance: float = 0.05
    max_offset_arcmin: float = 5.0
    max_elongation: float = 1.5
    min_sources: int = 5
    max_rotation_deg: float = 5.0  # largest camera rotation away from detector.rotation_deg
    max_doubled_fraction: float = 0.3  # sources with a same-offset twin: double exposure
    max_catalog_stars: int = 150  # brightest catalog stars used for pattern matching
    sip_degree: int = 0  # 0 = pure TAN; 2-3 adds SIP distortion when enough stars match


@dataclass(frozen=True)
class PhotometryConfig:
    """Aperture photometry and light curves."""

    annulus_inner_fwhm: float = 3.0
    annulus_outer_fwhm: float = 5.0
    max_comparison_stars: int = 8
    comparison_stars: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Optimal-aperture search range (FWHM units) and the curve-of-growth radius.
    aperture_min_fwhm: float = 0.4
    aperture_max_fwhm: float = 2.0
    growth_radius_fwhm: float = 3.0
    growth_min_snr: float = 150.0  # stars this bright (at the optimal aperture) build the curve
    growth_max_stars: int = 25
    centroid_min_snr: float = 20.0  # fainter stars are measured at the WCS position
    centroid_max_shift_fwhm: float = 1.0
    neighbour_max_contamination: float = 0.01  # fraction of a star's flux from neighbours
    sky_clip_sigma: float = 3.0
    sky_err_floor_e_per_px: float = 0.0  # systematic floor on the local-sky error
    cosmic_sigma: float = 5.0  # a cosmic-ray pixel stands this many sigma above its neighbours
    cosmic_contrast: float = 2.0  # ... and is this many times sharper than the stars' peaks
    # On a bright star's core, a pixel this far (fraction of the star's height) plus
    # cosmic_sigma above its mirror image through the centre is a hit. Round PSFs
    # stay within 0.04 (interpolation); raise it for a lopsided PSF (coma, trailing).
    cosmic_mirror_tolerance: float = 0.1
    # Light curves: comparison ensemble and zero point.
    comparison_max_err_mag: float = 0.02
    comparison_max_chi2: float = 4.0  # reduced chi^2 above which a comparison "varies"
    comparison_min_stars: int = 2
    zero_point_clip_sigma: float = 3.0
    # The target is measured on the detection nearest its position within this
    # radius (observers' logs round coordinates: the paper's OJ 287 is 12" off).
    target_search_arcsec: float = 15.0


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    site: SiteConfig = field(default_factory=SiteConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    cameras: dict[str, CameraConfig] = field(
        default_factory=lambda: {b: CameraConfig(band=b) for b in BANDS}
    )
    paths: PathsConfig = field(default_factory=PathsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    obslog: ObslogConfig = field(default_factory=ObslogConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    # [targets]: name = [ra_deg, dec_deg], the observer's own list; wins over
    # the catalog, SIMBAD and the log (names compared without case or spaces).
    targets: dict[str, tuple[float, ...]] = field(default_factory=dict)
    source: str = ""  # the file this came from, for messages

    @property
    def work_dir(self) -> Path:
        """The work folder (store, processed frames, masters, caches)."""
        return Path(self.paths.work).expanduser()

    def camera(self, band: str) -> CameraConfig:
        """Settings of the camera observing ``band`` (defaults if unconfigured)."""
        return self.cameras.get(band) or CameraConfig(band=band)


_CHOICES: dict[str, tuple[str, ...]] = {
    "daemon.observer": ("inotify", "polling"),
    "daemon.log_level": ("debug", "info", "warning", "error"),
    "daemon.log_format": ("auto", "json", "console"),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(_convert(v, inner, f"{key}[{n}]") for n, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        _kt, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported type")  # pragma: no cover - schema bug
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, table: Any, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(
            f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key "
            f"(allowed: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
        if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    det = cfg.detector
    if det.width_px <= 0 or det.height_px <= 0:
        raise ConfigError("detector.width_px/height_px: must be positive")
    if not 0.01 < det.pixel_scale_arcsec < 10:
        raise ConfigError(
            f"detector.pixel_scale_arcsec: {det.pixel_scale_arcsec} is not a plausible scale"
        )
    if not -90 <= cfg.site.latitude_deg <= 90:
        raise ConfigError("site.latitude_deg: must be within -90..90")
    if cfg.daemon.workers < 0:
        raise ConfigError("daemon.workers: must be >= 0 (0 = number of cores)")
    for name, radec in cfg.targets.items():
        if len(radec) != 2 or not (0 <= radec[0] < 360 and -90 <= radec[1] <= 90):
            raise ConfigError(f"targets.{name}: expected [ra_deg, dec_deg] with 0 <= ra < 360 "
                              f"and -90 <= dec <= 90, got {list(radec)!r}")
    if cfg.photometry.target_search_arcsec <= 0:
        raise ConfigError("photometry.target_search_arcsec: must be > 0")
    code = cfg.export.observer_code
    if code and not (code.isascii() and code.isalnum()):
        raise ConfigError(f"export.observer_code: {code!r} is not an AAVSO observer code "
                          "(letters and digits)")
    for band, cam in cfg.cameras.items():
        if cam.band not in BANDS:
            raise ConfigError(f"cameras.{band}.band: {cam.band!r} is not one of g, r, i")


def parse_config(table: dict[str, Any], source: str = "") -> Config:
    """Build a :class:`Config` from a parsed TOML table.

    Parameters
    ----------
    table : dict
        The parsed TOML document.
    source : str
        Where it came from, used in error messages.
    """
    table = dict(table)
    cams = table.pop("cameras", None)
    cfg = _build(Config, table, "")
    if cams is not None:
        if not isinstance(cams, dict):
            raise ConfigError("cameras: expected a table of [cameras.<band>] tables")
        cameras = {b: CameraConfig(band=b) for b in BANDS}
        for name, sub in cams.items():
            sub = dict(sub) if isinstance(sub, dict) else sub
            if isinstance(sub, dict):
                sub.setdefault("band", name)
            cameras[name] = _build(CameraConfig, sub, f"cameras.{name}")
        cfg = dataclasses.replace(cfg, cameras=cameras)
    cfg = dataclasses.replace(cfg, source=source)
    _validate(cfg)
    return cfg


def find_config_path(explicit: str | None) -> Path | None:
    """``--config``, else ``$PHOTD_CONFIG``, else ``./config.toml`` if it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PHOTD_CONFIG")
    if env:
        return Path(env)
    here = Path("config.toml")
    return here if here.exists() else None


def load_config(path: str | Path | None) -> Config:
    """Read a configuration file; ``None`` gives the documented defaults.

    Raises
    ------
    ConfigError
        If the file is missing, is not TOML, or a key is wrong.
    """
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        return parse_config(table, str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return ``cfg`` with command-line values replacing those of some sections.

    ``with_overrides(cfg, paths={"work": "w"})`` replaces ``paths.work``.
    """
    for name, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            section = dataclasses.replace(getattr(cfg, name), **values)
            cfg = dataclasses.replace(cfg, **{name: section})
    return cfg
