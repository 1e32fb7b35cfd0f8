"""Processed headers (paper Table 2), the frame writer and input conventions."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

import photd
from photd.config import CameraConfig, Config, DetectorConfig
from photd.headers import (
    HeaderError,
    band_from,
    build_header,
    cd_matrix,
    fits_safe,
    frame_number_from,
    obs_start,
    write_processed,
)
from photd.obslog import parse_line

OJ287 = parse_line("96,114,OJ287,300,08:54:48,+20:06:30", 6, "night.log")
SKYFLAT = parse_line("116,125,sky flat,1,,", 2, "night.log")
NO_COORDS = parse_line("96,114,OJ287,300,,", 6, "night.log")
CFG = Config()
SCALE_DEG = 0.107 / 3600


def camera_header(**extra) -> fits.Header:
    hdr = fits.Header()
    hdr["FRAMENUM"] = 100
    hdr["DATE-OBS"] = "2016-11-01T20:00:00"
    hdr["EXPTIME"] = 300.0
    hdr["XBINNING"] = 1
    hdr["INSTRUME"] = "XL126-g"
    hdr["CCD-TEMP"] = -100.0
    # A stale camera WCS guess that must not survive next to ours.
    hdr["CTYPE1"] = "RA--TAN"
    hdr["CDELT1"] = 1.0
    for key, value in extra.items():
        if value is None:
            hdr.remove(key.replace("_", "-"), ignore_missing=True)
        else:
            hdr[key.replace("_", "-")] = value
    return hdr


def make_raw(path, data=None, **extra):
    if data is None:
        rng = np.random.default_rng(1)
        data = (1070 + rng.normal(0, 6, (60, 40))).astype(np.uint16)
    fits.PrimaryHDU(data, header=camera_header(**extra)).writeto(path)
    return path


def header_for(entry=OJ287, cfg=CFG, raw=None, **kw):
    raw = (
        raw
        if raw is not None
        else fits.Header(
            [("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 40), ("NAXIS2", 60)]
        )
    )
    raw.extend(camera_header(), unique=True)
    kw.setdefault("frame_number", 100)
    return build_header(raw, entry, "g", cfg, **kw)


# ---------------------------------------------------------------- Table 2 cards


def test_site_pointing_and_type_cards():
    hdr = header_for()
    assert hdr["OBSERVAT"] == "Xinglong Observatory"
    assert hdr["LATITUDE"] == "+40:23:45"
    assert hdr["LONGITUD"] == "117:34:38"
    assert hdr["OBJECT"] == "OJ287"
    assert hdr["RADESYS"] == "ICRS"
    assert hdr["RA"] == "08:54:48.00"
    assert hdr["DEC"] == "+20:06:30.0"
    assert hdr["IMAGETYP"] == "object"
    assert hdr["FILTER"] == "g"
    assert hdr["EQUINOX"] == 2000.0


def test_negative_declination_near_zero_keeps_its_sign():
    entry = parse_line("1,2,SDSS J0000,60,01:00:00,-00:30:00")
    hdr = header_for(entry)
    assert hdr["DEC"] == "-00:30:00.0"
    assert hdr["CRVAL2"] == pytest.approx(-0.5)


def test_wcs_crval_is_log_pointing_and_crpix_is_frame_centre():
    hdr = header_for()
    assert hdr["WCSAXES"] == 2
    assert (hdr["CTYPE1"], hdr["CTYPE2"]) == ("RA---TAN", "DEC--TAN")
    assert (hdr["CUNIT1"], hdr["CUNIT2"]) == ("deg", "deg")
    assert hdr["CRVAL1"] == pytest.approx(133.7, abs=1e-12)
    assert hdr["CRVAL2"] == pytest.approx(20 + 6 / 60 + 30 / 3600, abs=1e-12)
    assert (hdr["CRPIX1"], hdr["CRPIX2"]) == ((40 + 1) / 2, (60 + 1) / 2)
    assert "CDELT1" not in hdr  # the camera's guess is gone


def test_full_frame_crpix_matches_paper():
    raw = fits.Header(
        [("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 2536), ("NAXIS2", 3358)]
    )
    hdr = header_for(raw=raw)
    assert (hdr["CRPIX1"], hdr["CRPIX2"]) == (1268.5, 1679.5)


def test_cd_matrix_from_scale_east_left_north_up():
    hdr = header_for()
    assert hdr["CD1_1"] == pytest.approx(-SCALE_DEG, rel=1e-12)
    assert hdr["CD2_2"] == pytest.approx(SCALE_DEG, rel=1e-12)
    assert hdr["CD1_2"] == 0 and hdr["CD2_1"] == 0
    # One pixel to the left (-x) is east: RA grows by scale / cos(dec).
    wcs = WCS(hdr)
    ra0, dec0 = wcs.all_pix2world([[hdr["CRPIX1"], hdr["CRPIX2"]]], 1)[0]
    ra1, _ = wcs.all_pix2world([[hdr["CRPIX1"] - 1, hdr["CRPIX2"]]], 1)[0]
    _, dec2 = wcs.all_pix2world([[hdr["CRPIX1"], hdr["CRPIX2"] + 1]], 1)[0]
    assert (ra0, dec0) == pytest.approx((133.7, 20.108333333))
    assert ra1 - ra0 == pytest.approx(SCALE_DEG / math.cos(math.radians(dec0)), rel=1e-4)
    assert dec2 - dec0 == pytest.approx(SCALE_DEG, rel=1e-4)


def test_cd_matrix_binning_rotation_and_mirror():
    hdr = header_for(binning=2)
    assert hdr["CD2_2"] == pytest.approx(2 * SCALE_DEG)
    s = 1.0 / 3600
    # Rotation 90: the +y axis points east, so +x points north (east left).
    assert cd_matrix(1.0, 90.0, True) == pytest.approx((0, s, s, 0), abs=1e-15)
    assert cd_matrix(1.0, 0.0, False) == pytest.approx((s, 0, 0, s), abs=1e-15)
    rotated = dataclasses.replace(CFG, detector=DetectorConfig(rotation_deg=30.0))
    hdr = header_for(cfg=rotated)
    c, n = math.cos(math.radians(30)), math.sin(math.radians(30))
    got = (hdr["CD1_1"], hdr["CD1_2"], hdr["CD2_1"], hdr["CD2_2"])
    assert got == pytest.approx(
        (-SCALE_DEG * c, SCALE_DEG * n, SCALE_DEG * n, SCALE_DEG * c), rel=1e-12
    )


def test_binning_none_reads_the_camera_key():
    raw = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 4)])
    raw["NAXIS2"] = 4
    raw["XBINNING"] = 2
    raw["DATE-OBS"] = "2016-11-01T20:00:00"
    hdr = build_header(raw, OJ287, "g", CFG, frame_number=100, binning=None)
    assert hdr["CD2_2"] == pytest.approx(2 * SCALE_DEG)


def test_exptime_from_log_overrides_camera_and_camera_value_is_kept():
    hdr = header_for(raw=None)
    assert hdr["EXPTIME"] == 300.0 and "CAMEXPT" not in hdr
    raw = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 4)])
    raw["NAXIS2"] = 4
    raw.extend(camera_header(EXPTIME=30.0), unique=True)
    hdr = build_header(raw, OJ287, "g", CFG, frame_number=100)
    assert hdr["EXPTIME"] == 300.0
    assert hdr["CAMEXPT"] == 30.0


def test_times_start_and_mid_exposure():
    hdr = header_for()
    assert hdr["DATE-OBS"] == "2016-11-01T20:00:00.000"
    assert hdr["TIME-OBS"] == "20:00:00.000"
    # MJD of 2016-11-01 00:00 UTC is 57693; 20:00 is 20/24 of a day.
    assert hdr["MJD-OBS"] == pytest.approx(57693 + 20 / 24, abs=1e-8)
    assert hdr["DATE-AVG"] == "2016-11-01T20:02:30.000"
    assert hdr["MJD-AVG"] == pytest.approx(57693 + 20 / 24 + 150 / 86400, abs=1e-8)


@pytest.mark.parametrize(
    ("cards", "iso"),
    [
        ({"DATE-OBS": "2016-11-01T20:00:00.5"}, "2016-11-01T20:00:00.500"),
        ({"DATE-OBS": "2016-11-01", "TIME-OBS": "20:00:00"}, "2016-11-01T20:00:00.000"),
        ({"DATE-OBS": "2016/11/01", "UT": "20:00:00"}, "2016-11-01T20:00:00.000"),
        ({"DATE-OBS": "01/11/96", "UT": "20:00"}, "1996-11-01T20:00:00.000"),
        ({"MJD-OBS": 57693.5}, "2016-11-01T12:00:00.000"),
        ({"DATE-OBS": "yesterday"}, None),
        ({}, None),
    ],
)
def test_obs_start_header_forms(cards, iso):
    hdr = fits.Header()
    for k, v in cards.items():
        hdr[k] = v
    start = obs_start(hdr)
    assert (start.isot if start is not None else None) == iso


def test_object_without_obs_time_is_rejected_with_reason():
    raw = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 4)])
    raw["NAXIS2"] = 4
    with pytest.raises(HeaderError) as info:
        build_header(raw, OJ287, "g", CFG, frame_number=100)
    assert info.value.reason == "no_obs_time"
    # A bias without a time is still usable.
    hdr = build_header(raw, parse_line("1,10,bias,0,,"), "g", CFG, frame_number=1)
    assert hdr["IMAGETYP"] == "bias" and "MJD-OBS" not in hdr


def _hand_airmass(ra_deg: float, dec_deg: float, mjd_utc: float) -> float:
    """Plane-parallel sec z with a textbook GMST, independent of astropy."""
    d = mjd_utc + 2400000.5 - 2451545.0
    gmst_h = (18.697374558 + 24.06570982441908 * d) % 24
    lst_deg = gmst_h * 15 + CFG.site.longitude_deg
    ha = math.radians(lst_deg - ra_deg)
    lat, dec = math.radians(CFG.site.latitude_deg), math.radians(dec_deg)
    sin_alt = math.sin(lat) * math.sin(dec) + math.cos(lat) * math.cos(dec) * math.cos(ha)
    return 1.0 / sin_alt


@pytest.mark.parametrize("date_obs", ["2016-11-01T20:00:00", "2016-11-01T18:00:00"])
def test_airmass_at_mid_exposure_agrees_with_hand_computation(date_obs):
    raw = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 4)])
    raw["NAXIS2"] = 4
    raw["DATE-OBS"] = date_obs
    hdr = build_header(raw, OJ287, "g", CFG, frame_number=100)
    mid_mjd = Time(date_obs, scale="utc").mjd + 150 / 86400
    expected = _hand_airmass(OJ287.ra_deg, OJ287.dec_deg, mid_mjd)
    assert 1.0 < expected < 2.5  # the test times keep the target well up
    assert hdr["AIRMASS"] == pytest.approx(expected, rel=0.01)


def test_no_airmass_below_horizon_or_without_coordinates():
    raw = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 4)])
    raw["NAXIS2"] = 4
    raw["DATE-OBS"] = "2016-11-01T08:00:00"  # 16:00 Beijing time: OJ287 is down
    assert _hand_airmass(OJ287.ra_deg, OJ287.dec_deg, Time(raw["DATE-OBS"]).mjd) < 0
    assert "AIRMASS" not in build_header(raw, OJ287, "g", CFG, frame_number=100)
    hdr = header_for(NO_COORDS)
    assert "AIRMASS" not in hdr and "CTYPE1" not in hdr and "RA" not in hdr


def test_calibration_frames_get_no_wcs_cards():
    hdr = header_for(SKYFLAT)
    assert hdr["IMAGETYP"] == "flat" and hdr["FLATTYPE"] == "sky"
    assert hdr["EXPTIME"] == 1.0 and hdr["CAMEXPT"] == 300.0
    for key in ("WCSAXES", "CTYPE1", "CTYPE2", "CRPIX1", "CRVAL1", "CD1_1", "CD2_2", "CDELT1"):
        assert key not in hdr
    assert "AIRMASS" not in hdr


def test_camera_cards_are_kept_and_extra_values_written():
    hdr = header_for(gain_e_per_adu=1.45, rdnoise_e=4.2, history=["bias subtracted"])
    for key, value in [
        ("BITPIX", 16),
        ("NAXIS", 2),
        ("FRAMENUM", 100),
        ("XBINNING", 1),
        ("INSTRUME", "XL126-g"),
        ("CCD-TEMP", -100.0),
    ]:
        assert hdr[key] == value
    assert hdr["GAIN"] == 1.45 and hdr["RDNOISE"] == 4.2
    history = [str(h) for h in hdr["HISTORY"]]
    assert history[0].startswith(f"photd {photd.__version__}: header rebuilt from night.log")
    assert history[1] == f"photd {photd.__version__}: bias subtracted"
    assert "GAIN" not in header_for() and "RDNOISE" not in header_for()


def test_frame_number_written_when_the_camera_has_none():
    raw = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 4)])
    raw["NAXIS2"] = 4
    raw["DATE-OBS"] = "2016-11-01T20:00:00"
    hdr = build_header(raw, OJ287, "g", CFG, frame_number=101)
    assert hdr["FRAMENUM"] == 101


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("OJ287", "OJ287"),
        ("Vénus", "Venus"),
        ("猎户", "\\u730e\\u6237"),
        ("a\tb\x00c\nd", "a b c d"),
        ("it's", "it's"),
        ("x" * 100, "x" * 65 + "..."),
    ],
)
def test_fits_safe(text, expected):
    assert fits_safe(text) == expected


def test_non_ascii_target_name_does_not_crash(tmp_path):
    raw = make_raw(tmp_path / "raw.fits")
    entry = parse_line(
        "96,114,猎户座测试\u200b'名字很长很长很长很长很长很长很长很长,300,05:35:17,-05:23:28"
    )
    hdr = build_header(fits.getheader(raw), entry, "g", CFG, frame_number=100)
    out = write_processed(raw, tmp_path / "work" / "out.fits", hdr)
    back = fits.getheader(out)
    assert back["OBJECT"].startswith("\\u730e\\u6237")
    assert len(back["OBJECT"]) <= 68


# ---------------------------------------------------------------- writing


def _data_section(path) -> bytes:
    with fits.open(path) as hdul:
        info = hdul.fileinfo(0)
    with open(path, "rb") as f:
        f.seek(info["datLoc"])
        return f.read(info["datSpan"])


def test_written_frame_has_identical_data_bytes_and_raw_is_untouched(tmp_path):
    (tmp_path / "raw").mkdir()
    raw = make_raw(tmp_path / "raw" / "0100.fits")
    before = raw.read_bytes()
    os.utime(raw, ns=(1_000_000_000, 1_000_000_000))  # a known mtime to compare with
    stat_before = raw.stat()
    hdr = build_header(fits.getheader(raw), OJ287, "g", CFG, frame_number=100)
    out = write_processed(raw, tmp_path / "work" / "g" / "0100.fits", hdr)
    assert out == tmp_path / "work" / "g" / "0100.fits"
    assert raw.read_bytes() == before
    assert raw.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert _data_section(out) == _data_section(raw)
    with fits.open(out) as hdul:
        assert hdul[0].header["BZERO"] == 32768 and hdul[0].header["BITPIX"] == 16
        assert np.array_equal(hdul[0].data, fits.getdata(raw))
        assert hdul[0].header["CRVAL1"] == pytest.approx(133.7)
    assert [p.name for p in out.parent.iterdir()] == ["0100.fits"]  # no temporary left


def test_failed_rename_leaves_old_output_and_no_temporary(tmp_path, monkeypatch):
    raw = make_raw(tmp_path / "raw.fits")
    out = tmp_path / "out.fits"
    out.write_bytes(b"old")
    hdr = build_header(fits.getheader(raw), OJ287, "g", CFG, frame_number=100)

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_processed(raw, out, hdr)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits", "raw.fits"]


def test_header_describing_other_data_is_refused(tmp_path):
    raw = make_raw(tmp_path / "raw.fits")
    hdr = build_header(fits.getheader(raw), OJ287, "g", CFG, frame_number=100)
    hdr["BZERO"] = 0
    with pytest.raises(HeaderError) as info:
        write_processed(raw, tmp_path / "out.fits", hdr)
    assert info.value.reason == "structure_mismatch" and "BZERO" in str(info.value)
    assert not (tmp_path / "out.fits").exists()


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.float32])
def test_compressed_copy_round_trips_losslessly(tmp_path, dtype):
    rng = np.random.default_rng(3)
    data = (1070 + rng.normal(0, 6, (64, 48))).astype(dtype)
    raw = make_raw(tmp_path / "raw.fits", data=data)
    hdr = build_header(fits.getheader(raw), OJ287, "g", CFG, frame_number=100)
    out = write_processed(raw, tmp_path / "work" / "0100.fits", hdr, compress=True)
    assert out.name == "0100.fits.fz"
    with fits.open(out) as hdul:
        back = hdul[1].data
        original = fits.getdata(raw)
        assert (back.dtype.kind, back.dtype.itemsize) == (
            original.dtype.kind,
            original.dtype.itemsize,
        )
        assert np.array_equal(back, fits.getdata(raw))
        assert hdul[1].header["OBJECT"] == "OJ287"
        assert hdul[1].header["CRVAL1"] == pytest.approx(133.7)
    with fits.open(out, disable_image_compression=True) as hdul:
        expected = "GZIP_2" if data.dtype.kind == "f" else "RICE_1"
        assert hdul[1].header["ZCMPTYPE"] == expected


# ---------------------------------------------------------------- input conventions


@pytest.mark.parametrize(
    ("cards", "key", "filename", "expected"),
    [
        ({"FRAMENUM": 42}, "FRAMENUM", "xl126g_0012.fits", 42),
        ({"FRAMENO": 43}, "FRAMENUM", "x.fits", 43),
        ({"IMGNUM": "0044"}, "FRAMENUM", "x.fits", 44),
        ({"SEQNUM": 45}, "SEQNUM", "x.fits", 45),
        ({"FRAMENUM": 46.0}, "FRAMENUM", "x.fits", 46),
        ({"FRAMENUM": "n/a"}, "FRAMENUM", "xl126g_0012.fits", 12),
        ({}, "FRAMENUM", "xl126g_0012.fits", 12),  # last run of digits, not 126
        ({}, "FRAMENUM", "0012-r.fits", 12),
        ({}, "FRAMENUM", "20161101/obs_0099.fits.fz", 99),
        ({}, "FRAMENUM", "img.fits", None),
    ],
)
def test_frame_number_from(cards, key, filename, expected):
    hdr = fits.Header()
    for k, v in cards.items():
        hdr[k] = v
    assert frame_number_from(hdr, filename, key) == expected


def test_band_from_follows_the_contract_order(tmp_path):
    root = tmp_path / "raw"
    cfg = CFG
    # Folder named after the band, below the watched root or the root itself.
    assert band_from(root / "r" / "0012.fits", None, cfg, root) == "r"
    assert band_from(root / "night1" / "I" / "0012.fits", None, cfg, root) == "i"
    assert band_from(tmp_path / "g" / "0012.fits", None, cfg, tmp_path / "g") == "g"
    # Band letter alone in the file name.
    assert band_from(root / "xl126_g_0012.fits", None, cfg, root) == "g"
    assert band_from(root / "0012-r.fits", None, cfg, root) == "r"
    assert band_from(root / "xl126g_0012.fits", None, cfg, root) is None
    # FILTER header last.
    for value, band in [("SDSS g'", "g"), ("r", "r"), ("i-band", "i"), ("ip", "i"), ("V", None)]:
        hdr = fits.Header()
        hdr["FILTER"] = value
        assert band_from(root / "0012.fits", hdr, cfg, root) == band
    # The file-name letter wins over the header.
    hdr = fits.Header()
    hdr["FILTER"] = "i"
    assert band_from(root / "xl126_g_0012.fits", hdr, cfg, root) == "g"
    # Configured camera folders win over everything.
    mapped = dataclasses.replace(cfg, cameras={"r": CameraConfig(band="r", folder="cam2")})
    assert band_from(root / "cam2" / "g" / "xl126_g_1.fits", hdr, mapped, root) == "r"
    absolute = dataclasses.replace(
        cfg, cameras={"i": CameraConfig(band="i", folder=str(tmp_path / "elsewhere"))}
    )
    assert band_from(tmp_path / "elsewhere" / "1.fits", None, absolute, root) == "i"
