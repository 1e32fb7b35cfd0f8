"""Processed-frame headers (paper Table 2) and the frame writer.

:func:`build_header` is pure: raw header + observing-log entry + config in,
new header out. :func:`write_processed` is the only function here that
touches files: it writes a new file next to nothing but its own temporary
and never opens the raw frame for writing.

WCS convention
--------------
The first-guess WCS is a TAN projection centred on the frame
(``CRPIX = (NAXIS + 1) / 2``) at the log's pointing. With ``s`` the pixel
scale in degrees (``DetectorConfig.pixel_scale_arcsec * binning / 3600``),
``theta`` the position angle of the detector +y axis measured from north
through east (``DetectorConfig.rotation_deg``) and ``p = +1`` when east is
to the left at ``theta = 0`` (``east_left``), ``p = -1`` when mirrored::

    CD1_1 = -p s cos(theta)    CD1_2 = s sin(theta)
    CD2_1 =  p s sin(theta)    CD2_2 = s cos(theta)

so at ``theta = 0`` and east left, ``CD = [[-s, 0], [0, s]]`` (north up,
east left); the +y axis points to position angle ``theta`` on the sky.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import astropy.units as u
import numpy as np
from astropy.coordinates import AltAz, Angle, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.utils import iers
from astropy.wcs import WCS

from photd import __version__
from photd.atomic import atomic_write
from photd.config import BANDS, Config, SiteConfig
from photd.errors import FrameStop
from photd.obslog import LogEntry

__all__ = [
    "HeaderError",
    "airmass",
    "band_from",
    "binning_from",
    "build_header",
    "cd_matrix",
    "fits_safe",
    "frame_number_from",
    "obs_start",
    "set_wcs",
    "write_processed",
]

#: Longest string value that fits on one FITS card (80 - 10 - 2 quotes).
FITS_STRING_MAX = 68

FRAME_NUMBER_KEYS = ("FRAMENUM", "FRAMENO", "IMGNUM")

# Cards describing the data array itself: they must stay as the camera wrote
# them so that the copied data bytes keep their meaning.
_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "BZERO", "BSCALE", "PCOUNT", "GCOUNT")

# A camera's own WCS guess is dropped: mixing it with ours (e.g. its CDELT
# with our CD) would give a WCS that neither of us meant.
_CAMERA_WCS = re.compile(
    r"^(WCSAXES|CTYPE\d|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+"
    r"|LONPOLE|LATPOLE|[AB]P?_ORDER|[AB]P?_\d+_\d+|[AB]_DMAX)$"
)


class HeaderError(FrameStop, ValueError):
    """A header cannot be built for this frame.

    Attributes
    ----------
    reason : str
        Machine-readable reason (``no_obs_time``, ``no_image``,
        ``structure_mismatch``) for the frame's state.
    """


# --------------------------------------------------------------------------- text


def fits_safe(text: str, max_len: int = FITS_STRING_MAX) -> str:
    """Make any text a valid FITS string value.

    Parameters
    ----------
    text : str
        E.g. a target name from a GBK-encoded log.
    max_len : int
        Longest result (characters); longer text is cut and ends in ``...``.

    Returns
    -------
    str
        Printable ASCII only: accented letters lose their accent
        (``Vénus`` -> ``Venus``), control characters become spaces, other
        characters are escaped as ``\\uXXXX`` (``猎`` -> ``\\u730e``) so the
        original stays recoverable.
    """
    out: list[str] = []
    for ch in text:
        if " " <= ch <= "~":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Zs", "Zl", "Zp"):
            out.append(" ")
        else:
            plain = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode("ascii")
            if plain and all(" " <= c <= "~" for c in plain):
                out.append(plain)
            elif ord(ch) <= 0xFFFF:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(f"\\U{ord(ch):08x}")
    safe = re.sub(r" {2,}", " ", "".join(out)).strip()
    if len(safe) > max_len:
        safe = safe[: max_len - 3] + "..."
    return safe


def _sexagesimal(deg: float, *, hours: bool = False, sign: bool = False, precision: int = 0) -> str:
    unit = u.hourangle if hours else u.deg
    return Angle(deg, unit=u.deg).to_string(
        unit=unit, sep=":", precision=precision, pad=True, alwayssign=sign
    )


# --------------------------------------------------------------------------- time, sky


def obs_start(header: fits.Header) -> Time | None:
    """Start of the exposure (UTC) from the camera header.

    Tries ``DATE-OBS`` with a time part; ``DATE-OBS`` (date only, also
    ``yyyy/mm/dd`` or the old ``dd/mm/yy``) joined with ``TIME-OBS``, ``UT``,
    ``UTC``, ``UTSTART`` or ``TIME``; then ``MJD-OBS``, then ``JD``.

    Returns
    -------
    astropy.time.Time or None
        ``None`` if the header gives no usable time.
    """
    date = str(header.get("DATE-OBS", "")).strip()
    m = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{2})", date)
    if m:  # pre-2000 FITS dd/mm/yy
        day, month, year = (int(g) for g in m.groups())
        date = f"{1900 + year if year >= 50 else 2000 + year:04d}-{month:02d}-{day:02d}"
    date = date.replace("/", "-")
    if date and "T" not in date:
        for key in ("TIME-OBS", "UT", "UTC", "UTSTART", "TIME"):
            clock = str(header.get(key, "")).strip()
            if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d*)?)?", clock):
                date = f"{date}T{clock}"
                break
    if date:
        try:
            return Time(date, format="isot", scale="utc")
        except ValueError:
            pass
    for key, fmt in (("MJD-OBS", "mjd"), ("JD", "jd")):
        value = header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return Time(float(value), format=fmt, scale="utc")
    return None


def _offline_iers() -> None:
    # photd works offline: never download IERS tables, and for dates past
    # the bundled tables accept the predicted values (a few arcsec of error
    # at most, irrelevant for airmass) instead of raising.
    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    iers.conf.iers_degraded_accuracy = "ignore"


def airmass(ra_deg: float, dec_deg: float, when: Time, site: SiteConfig) -> float | None:
    """Airmass of a position seen from the site at a given time.

    Parameters
    ----------
    ra_deg, dec_deg : float
        ICRS position (degrees).
    when : astropy.time.Time
        The instant (normally mid-exposure).
    site : SiteConfig
        Observatory latitude, longitude (degrees, east positive) and elevation (m).

    Returns
    -------
    float or None
        Pickering (2002) airmass of the geometric altitude ``h`` (degrees),
        ``1 / sin(h + 244 / (165 + 47 h**1.1))``, which equals sec z within
        0.2 % above 30 deg altitude and stays finite near the horizon;
        ``None`` when the position is below the horizon.
    """
    _offline_iers()
    location = EarthLocation.from_geodetic(
        site.longitude_deg * u.deg, site.latitude_deg * u.deg, site.elevation_m * u.m
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA "dubious year" and IERS-range notices
        altaz = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs").transform_to(
            AltAz(obstime=when, location=location)
        )
    alt = float(altaz.alt.to_value(u.deg))
    if alt <= 0:
        return None
    return 1.0 / math.sin(math.radians(alt + 244.0 / (165.0 + 47.0 * alt**1.1)))


def cd_matrix(
    scale_arcsec: float, rotation_deg: float = 0.0, east_left: bool = True
) -> tuple[float, float, float, float]:
    """CD matrix of the module's convention (see the module docstring).

    Parameters
    ----------
    scale_arcsec : float
        Pixel scale of the (binned) pixels (arcsec/pixel).
    rotation_deg : float
        Position angle of the detector +y axis, north through east (degrees).
    east_left : bool
        True if east is to the left (RA grows towards -x) at rotation 0.

    Returns
    -------
    tuple of float
        ``(CD1_1, CD1_2, CD2_1, CD2_2)`` in degrees/pixel.
    """
    s = scale_arcsec / 3600.0
    p = 1.0 if east_left else -1.0
    c, n = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return (-p * s * c, s * n, p * s * n, s * c)


# --------------------------------------------------------------------------- header


def binning_from(header: fits.Header, keys: Iterable[str] = ("XBINNING", "CCDXBIN", "BINX")) -> int:
    """Binning factor from the first of ``keys`` holding a positive integer (default 1)."""
    for key in keys:
        value = header.get(key)
        try:
            factor = int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if factor >= 1 and factor == value:
            return factor
    return 1


def build_header(
    raw_header: fits.Header,
    entry: LogEntry,
    band: str | None,
    cfg: Config,
    *,
    frame_number: int,
    binning: int | None = 1,
    gain_e_per_adu: float | None = None,
    rdnoise_e: float | None = None,
    history: Iterable[str] = (),
) -> fits.Header:
    """The processed header of one frame (paper Table 2).

    Parameters
    ----------
    raw_header : astropy.io.fits.Header
        The camera's header; not modified. Its data-structure cards (BITPIX,
        NAXISn, BZERO, BSCALE) and other camera cards are kept.
    entry : LogEntry
        The observing-log line covering the frame.
    band : str or None
        ``g``, ``r`` or ``i``, written as FILTER.
    cfg : Config
        Site and detector settings.
    frame_number : int
        The frame's number (written under ``detector.frame_number_key`` if
        the camera did not).
    binning : int or None
        On-chip binning; the pixel scale is multiplied by it. ``None`` reads
        it from ``detector.binning_keys``.
    gain_e_per_adu, rdnoise_e : float, optional
        Gain (e-/ADU) and read noise (e-), written as GAIN and RDNOISE.
    history : iterable of str
        Processing steps, one HISTORY card each, prefixed with the photd version.

    Returns
    -------
    astropy.io.fits.Header
        A new header. Object frames with a pointing get RA/DEC, RADESYS and a
        first-guess TAN WCS plus AIRMASS at mid-exposure; calibration frames
        get no WCS cards. EXPTIME is the log's value; a different camera
        value is kept as CAMEXPT.

    Raises
    ------
    HeaderError
        ``no_obs_time`` if an object frame has no usable DATE-OBS (its
        measurements could not be timed), ``no_image`` if it has no 2-D data.
    """
    hdr = raw_header.copy()
    for key in [k for k in hdr.keys() if _CAMERA_WCS.match(k)]:
        del hdr[key]
    if binning is None:
        binning = binning_from(raw_header, cfg.detector.binning_keys)
    is_object = entry.kind == "object"

    start = obs_start(raw_header)
    if start is None and is_object:
        raise HeaderError(
            "no_obs_time", "camera header has no usable DATE-OBS/TIME-OBS: cannot time the frame"
        )
    if is_object and (hdr.get("NAXIS", 0) < 2 or "NAXIS1" not in hdr or "NAXIS2" not in hdr):
        raise HeaderError("no_image", "primary HDU holds no 2-D image")

    _write_site_and_kind(hdr, raw_header, entry, band, cfg.site)
    _write_exposure(hdr, raw_header, entry.exptime_s)
    mid = _write_times(hdr, start, entry.exptime_s)
    if entry.has_coordinates:
        _write_pointing(hdr, entry, cfg, binning, mid, is_object=is_object)
    _write_provenance(hdr, entry, cfg.detector.frame_number_key, frame_number,
                      gain_e_per_adu, rdnoise_e, history)
    return hdr


def _write_site_and_kind(hdr: fits.Header, raw_header: fits.Header, entry: LogEntry,
                         band: str | None, site: SiteConfig) -> None:
    """Observatory, object, frame kind and band; a different camera FILTER is kept."""
    hdr["OBSERVAT"] = (fits_safe(site.name), "observatory")
    hdr["LATITUDE"] = (_sexagesimal(site.latitude_deg, sign=True), "site latitude [deg]")
    hdr["LONGITUD"] = (_sexagesimal(site.longitude_deg), "site longitude, east positive [deg]")
    hdr["SITEELEV"] = (site.elevation_m, "site elevation [m]")
    hdr["OBJECT"] = (fits_safe(entry.name), "from the observing log")
    hdr["IMAGETYP"] = (entry.kind, "bias, dark, flat or object")
    if entry.flat_type:
        hdr["FLATTYPE"] = (entry.flat_type, "sky or dome flat")
    if band:
        camera_filter = raw_header.get("FILTER")
        if camera_filter is not None and str(camera_filter).strip() != band:
            hdr["CAMFILT"] = (camera_filter, "FILTER as written by the camera")
        hdr["FILTER"] = (band, "band")


def _write_exposure(hdr: fits.Header, raw_header: fits.Header, exptime_s: float) -> None:
    """EXPTIME from the log; a different camera value is kept as CAMEXPT."""
    camera_exptime = None
    for key in ("EXPTIME", "EXPOSURE"):
        value = raw_header.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            camera_exptime = float(value)
            break
    if camera_exptime is not None and not math.isclose(
        camera_exptime, exptime_s, rel_tol=1e-6, abs_tol=1e-3
    ):
        hdr["CAMEXPT"] = (camera_exptime, "[s] camera exposure, overridden by the log")
        if "EXPOSURE" in hdr:
            hdr["EXPOSURE"] = (exptime_s, "[s] exposure time from the observing log")
    hdr["EXPTIME"] = (exptime_s, "[s] exposure time from the observing log")


def _write_times(hdr: fits.Header, start: Time | None, exptime_s: float) -> Time | None:
    """Start and mid-exposure (UTC); returns the mid-exposure time (None without a start)."""
    if start is None:
        return None
    mid = start + exptime_s / 2.0 * u.s
    hdr["TIMESYS"] = ("UTC", "time scale of DATE-OBS etc.")
    hdr["DATE-OBS"] = (start.isot, "start of exposure (UTC)")
    hdr["TIME-OBS"] = (start.isot.split("T")[1], "start of exposure (UTC)")
    hdr["MJD-OBS"] = (round(start.mjd, 8), "[d] MJD at start of exposure (UTC)")
    hdr["DATE-AVG"] = (mid.isot, "mid-exposure (UTC)")
    hdr["MJD-AVG"] = (round(mid.mjd, 8), "[d] MJD at mid-exposure (UTC)")
    return mid


def _write_pointing(hdr: fits.Header, entry: LogEntry, cfg: Config, binning: int,
                    mid: Time | None, *, is_object: bool) -> None:
    """RA/DEC of the log's pointing; an object frame also gets the first-guess WCS and
    the airmass at mid-exposure."""
    assert entry.ra_deg is not None and entry.dec_deg is not None
    hdr["RADESYS"] = ("ICRS", "reference frame of RA/DEC")
    hdr["EQUINOX"] = (2000.0, "equinox of RA/DEC")
    hdr["RA"] = (_sexagesimal(entry.ra_deg, hours=True, precision=2), "pointing (hh:mm:ss)")
    hdr["DEC"] = (
        _sexagesimal(entry.dec_deg, sign=True, precision=1),
        "pointing (dd:mm:ss)",
    )
    if is_object:
        _write_wcs(hdr, entry.ra_deg, entry.dec_deg, cfg, binning)
        if mid is not None:
            x = airmass(entry.ra_deg, entry.dec_deg, mid, cfg.site)
            if x is not None:
                hdr["AIRMASS"] = (round(x, 4), "at mid-exposure (Pickering 2002)")


def _write_provenance(hdr: fits.Header, entry: LogEntry, frame_number_key: str,
                      frame_number: int, gain_e_per_adu: float | None, rdnoise_e: float | None,
                      history: Iterable[str]) -> None:
    """Gain, read noise, frame number (unless the camera wrote it), the log line and
    the HISTORY of the processing."""
    if gain_e_per_adu is not None:
        hdr["GAIN"] = (float(gain_e_per_adu), "[e-/ADU] gain")
    if rdnoise_e is not None:
        hdr["RDNOISE"] = (float(rdnoise_e), "[e-] read noise")
    if frame_number_key not in hdr:
        hdr[frame_number_key] = (int(frame_number), "frame number (from the file name)")
    hdr["OBSLOG"] = (fits_safe(Path(entry.source).name), "observing log file")
    hdr["OBSLOGLN"] = (entry.line_no, "line of the observing log")
    hdr["HISTORY"] = (
        f"photd {__version__}: header rebuilt from {fits_safe(Path(entry.source).name)} "
        f"line {entry.line_no}"
    )
    for step in history:
        hdr["HISTORY"] = f"photd {__version__}: {fits_safe(step, max_len=1000)}"


def _write_wcs(hdr: fits.Header, ra_deg: float, dec_deg: float, cfg: Config, binning: int) -> None:
    det = cfg.detector
    cd = cd_matrix(det.pixel_scale_arcsec * binning, det.rotation_deg, det.east_left)
    hdr["WCSAXES"] = (2, "number of WCS axes")
    hdr["CTYPE1"] = ("RA---TAN", "TAN projection")
    hdr["CTYPE2"] = ("DEC--TAN", "TAN projection")
    hdr["CRPIX1"] = ((hdr["NAXIS1"] + 1) / 2.0, "frame centre")
    hdr["CRPIX2"] = ((hdr["NAXIS2"] + 1) / 2.0, "frame centre")
    hdr["CRVAL1"] = (ra_deg, "[deg] pointing RA from the observing log")
    hdr["CRVAL2"] = (dec_deg, "[deg] pointing Dec from the observing log")
    hdr["CUNIT1"] = ("deg", "")
    hdr["CUNIT2"] = ("deg", "")
    for name, value in zip(("CD1_1", "CD1_2", "CD2_1", "CD2_2"), cd, strict=True):
        hdr[name] = (value, "[deg/px] first guess from the nominal scale")


# Cards of a WCS's linear transform and distortion. The FITS standard (WCS
# paper I, 2.1.2) forbids CDi_j beside PCi_j/CDELTi/CROTAi: a reader that
# prefers CD would take the first guess and miss the fit by pixels.
_WCS_LINEAR = re.compile(r"^(CD\d_\d|PC\d_\d|CDELT\d|CROTA\d|PV\d_\d+|PS\d_\d+"
                         r"|[AB]P?_ORDER|[AB]P?_\d+_\d+|[AB]_DMAX)$")
# Time cards a WCS carries from the header it was read from: the Table-2
# values stay as build_header wrote them.
_WCS_TIME = ("DATE-OBS", "MJD-OBS", "DATE-BEG", "DATE-AVG", "MJD-AVG", "DATE-END")


def set_wcs(header: fits.Header, wcs: WCS) -> fits.Header:
    """Replace the header's WCS with ``wcs``, so it carries one representation.

    The first guess's linear transform (``CDi_j``, or ``PCi_j`` with
    ``CDELTi``/``CROTAi``) and any distortion cards are removed before the
    fitted WCS is written (``wcs.to_header(relax=True)``: ``PCi_j`` and
    ``CDELTi``, SIP when fitted); the guess survives as one HISTORY line.
    Time cards already in the header are left as they are.

    Returns
    -------
    astropy.io.fits.Header
        ``header``, changed in place.
    """
    old = {k: header[k] for k in header if _WCS_LINEAR.match(k)}
    if old:
        keys = [k for k in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2") if k in header]
        text = " ".join(f"{k}={header[k]:.10g}" for k in keys if isinstance(header[k], float | int))
        text += " " + " ".join(f"{k}={v:.6e}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in old.items())
        header.add_history(f"photd {__version__}: WCS first guess, replaced by the fit: {text}")
    for key in old:
        del header[key]
    for card in wcs.to_header(relax=True).cards:
        if card.keyword in _WCS_TIME and card.keyword in header:
            continue
        header[card.keyword] = (card.value, card.comment)
    return header


# --------------------------------------------------------------------------- writing


def _structure(header: fits.Header) -> dict[str, object]:
    naxis = int(header.get("NAXIS", 0))
    keys = ["BITPIX", "NAXIS", *(f"NAXIS{i}" for i in range(1, naxis + 1))]
    keys += ["BZERO", "BSCALE", "PCOUNT", "GCOUNT", "BLANK"]
    return {k: header.get(k) for k in keys}


def write_processed(
    raw_path: str | Path, out_path: str | Path, header: fits.Header, *, compress: bool = False
) -> Path:
    """Write a raw frame's data under a new header, atomically.

    Parameters
    ----------
    raw_path : str or Path
        The camera's file; opened read-only, never modified.
    out_path : str or Path
        Destination (its folder is created). With ``compress`` a ``.fz``
        suffix is added if missing.
    header : astropy.io.fits.Header
        From :func:`build_header`; its BITPIX, NAXISn, BZERO and BSCALE must
        equal the raw ones.
    compress : bool
        Rice tile compression (lossless for integer data); float data use
        GZIP_2 without quantisation, also lossless. Integer data with a
        scaling other than none or the unsigned-integer offset cannot be
        compressed losslessly by astropy and are written uncompressed (the
        returned path then has no ``.fz``).

    Returns
    -------
    Path
        Where the frame was written. Uncompressed, the file's data section
        is byte-for-byte the raw data section.

    Raises
    ------
    HeaderError
        ``structure_mismatch`` if the header describes other data, or
        ``truncated`` if the raw file is shorter than its header says.
    """
    raw_path, out_path = Path(raw_path), Path(out_path)
    with fits.open(raw_path, mode="readonly", do_not_scale_image_data=True, memmap=False) as hdul:
        raw_header = hdul[0].header
        mismatch = {
            k: (v, header.get(k)) for k, v in _structure(raw_header).items() if header.get(k) != v
        }
        if mismatch or header.cards[0].keyword != "SIMPLE":
            raise HeaderError(
                "structure_mismatch",
                f"{raw_path.name}: new header describes other data: "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in mismatch.items()),
            )
        bitpix = int(raw_header["BITPIX"])
        bzero = raw_header.get("BZERO", 0)
        bscale = raw_header.get("BSCALE", 1)
        unsigned_offset = bitpix > 0 and bscale == 1 and bzero == 2 ** (bitpix - 1)
        can_compress = bitpix < 0 or (bscale == 1 and (bzero == 0 or unsigned_offset))
        has_data = int(raw_header.get("NAXIS", 0)) > 0
        if compress and can_compress and has_data:
            if not out_path.name.endswith(".fz"):
                out_path = out_path.with_name(out_path.name + ".fz")
            data = hdul[0].data
            if unsigned_offset:
                # Hand astropy the unsigned values; it stores them with the
                # same BZERO offset, so the stored integers are unchanged.
                data = (data.astype(np.int64) + bzero).astype(f"uint{bitpix}")
            comp_header = header.copy()
            for key in [k for k in comp_header if k in _STRUCTURAL or k.startswith("NAXIS")]:
                comp_header.remove(key, ignore_missing=True, remove_all=True)
            if bitpix < 0:
                comp = fits.CompImageHDU(
                    data, comp_header, compression_type="GZIP_2", quantize_level=0.0
                )
            else:
                comp = fits.CompImageHDU(data, comp_header, compression_type="RICE_1")
            payload = fits.HDUList([fits.PrimaryHDU(), comp])
            return atomic_write(out_path, lambda f: payload.writeto(f))
        if out_path.name.endswith(".fz"):
            out_path = out_path.with_name(out_path.name[:-3])
        # Copy the stored bytes from the first data block to the end of the
        # last HDU: no decode/encode round trip that could change a bit.
        spans = [hdul.fileinfo(i) for i in range(len(hdul))]
        begin = spans[0]["datLoc"]
        end = spans[-1]["datLoc"] + spans[-1]["datSpan"]

    if raw_path.stat().st_size < end:
        raise HeaderError("truncated", f"{raw_path.name}: file shorter than its header says")
    header_bytes = header.tostring(padding=True).encode("ascii")

    def copy(f: BinaryIO) -> None:
        f.write(header_bytes)
        with open(raw_path, "rb") as raw:
            raw.seek(begin)
            remaining = end - begin
            while remaining > 0:
                chunk = raw.read(min(remaining, 1 << 22))
                if not chunk:
                    raise HeaderError("truncated", f"{raw_path.name}: file ended early")
                f.write(chunk)
                remaining -= len(chunk)

    return atomic_write(out_path, copy)


# --------------------------------------------------------------------------- inputs


_FRAME_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".gz", ".bz2")


def _stem(filename: str | Path) -> str:
    name = Path(filename).name
    lowered = name.lower()
    stripped = True
    while stripped:
        stripped = False
        for suffix in _FRAME_SUFFIXES:
            if lowered.endswith(suffix) and len(lowered) > len(suffix):
                name, lowered = name[: -len(suffix)], lowered[: -len(suffix)]
                stripped = True
    return name


def frame_number_from(
    header: fits.Header | None, filename: str | Path, key: str = "FRAMENUM"
) -> int | None:
    """The frame number the observing log counts (DESIGN contract).

    Parameters
    ----------
    header : astropy.io.fits.Header or None
        The raw header.
    filename : str or Path
        The raw file's name or path.
    key : str
        ``detector.frame_number_key``; ``FRAMENUM``, ``FRAMENO`` and
        ``IMGNUM`` are tried after it.

    Returns
    -------
    int or None
        The first of those keys holding a whole number >= 0, else the
        **last** run of digits in the file name without its FITS suffixes
        (``xl126g_0012.fits`` -> 12), else ``None``.
    """
    if header is not None:
        for k in dict.fromkeys((key, *FRAME_NUMBER_KEYS)):
            value = header.get(k)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, str):
                value = value.strip()
                if not value.isdigit():
                    continue
                return int(value)
            if (
                isinstance(value, int | float | np.integer | np.floating)
                and float(value).is_integer()
            ):
                if value >= 0:
                    return int(value)
    runs = re.findall(r"\d+", _stem(filename))
    return int(runs[-1]) if runs else None


def _band_word(text: str) -> str | None:
    # "SDSS g'", "g-band", "gp", "r_sdss" -> the bare band letter.
    t = text.strip().lower()
    t = re.sub(r"sdss|band|filter|prime|[\s'\"_\-]", "", t)
    if t in BANDS:
        return t
    if len(t) == 2 and t[1] == "p" and t[0] in BANDS:
        return t[0]
    return None


def band_from(
    path: str | Path, header: fits.Header | None, cfg: Config, watched_root: str | Path | None
) -> str | None:
    """The band of a raw frame (DESIGN contract, first rule that answers).

    1. A configured camera whose ``folder`` (absolute, or relative to the
       watched root) contains the file.
    2. A folder named ``g``, ``r`` or ``i`` (any case): the watched root
       itself or a folder between it and the file, the closest one winning.
       Without a root only the file's own folder counts.
    3. A band letter standing alone between separators in the file name
       (``xl126_g_0012.fits``, ``0012-r.fits``); ignored if several differ.
    4. The FILTER header key if it names g, r or i (``sdss g``, ``g'``...).

    Returns
    -------
    str or None
        ``g``, ``r``, ``i`` or ``None`` when nothing says.
    """
    path = Path(os.path.abspath(path))
    root = Path(os.path.abspath(watched_root)) if watched_root is not None else None

    for cam in cfg.cameras.values():
        if not cam.folder:
            continue
        folder = Path(cam.folder).expanduser()
        if not folder.is_absolute():
            if root is None:
                continue
            folder = root / folder
        if path.is_relative_to(Path(os.path.abspath(folder))):
            return cam.band

    if root is not None and path.is_relative_to(root):
        folders = [root.name, *path.relative_to(root).parent.parts]
    else:
        folders = [path.parent.name]
    for name in reversed(folders):
        if name.lower() in BANDS:
            return name.lower()

    letters = {
        m.lower() for m in re.findall(r"(?:^|[_\-.\s])([A-Za-z])(?=[_\-.\s]|$)", _stem(path))
    } & set(BANDS)
    if len(letters) == 1:
        return letters.pop()

    if header is not None and "FILTER" in header:
        return _band_word(str(header["FILTER"]))
    return None
