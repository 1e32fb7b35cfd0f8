"""Fuzzing the parsers that read what strangers write: observing logs and FITS headers.

Bounded example counts keep CI fast; the properties are the documented
contracts, not the current outputs.
"""

from __future__ import annotations

import io
import math

import numpy as np
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from photd.config import BANDS, Config
from photd.headers import band_from, frame_number_from
from photd.obslog import LogProblem, ObservingLog, parse_log
from photd.watcher import BLOCK, check_complete

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
CFG = Config()
REASONS = {None, "empty", "partial_header", "truncated", "not_fits", "unreadable"}

# --------------------------------------------------------------------------- observing log

_number = st.one_of(st.integers(-5, 400).map(str), st.sampled_from(["", " 7", "+3", "1e2", "x",
                                                                     "٣", "１２", "10.0"]))
_name = st.one_of(st.sampled_from(["bias", "Sky Flat", "dome_flat", "DARKS", "OJ287", "../x",
                                   "a'; DROP TABLE frames;--", "猎户座", "bell\x07", "", "#x"]),
                  st.text(max_size=12))
_exposure = st.one_of(st.sampled_from(["300", "0", "-5", "1e400", "nan", "300s", "x", ""]),
                      st.floats(allow_nan=True).map(str))
_ra = st.one_of(st.sampled_from(["", "08:54:48", "08 54 48", "25:00:00", "08:61:00", "133.7",
                                 "8h54m48s", "-01:00:00", "nan", "inf", "1e999"]),
                st.text(max_size=10))
_dec = st.one_of(st.sampled_from(["", "+20:06:30", "-90:00:01", "+95", "north", "-0:00:01"]),
                 st.text(max_size=10))
_line = st.one_of(
    st.tuples(_number, _number, _name, _exposure, _ra, _dec).map(",".join),
    st.lists(st.text(max_size=8), max_size=9).map(",".join),
    st.sampled_from(["", "   ", "# comment", "1,10,bias,1,,,,", "\ufeff1,2,bias,1,,"]),
)
_endings = st.sampled_from(["\n", "\r\n", "\r"])


def _check_log(log: ObservingLog, data: bytes | str) -> None:
    assert isinstance(log, ObservingLog)
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    n_lines = max(1, len(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")))
    for problem in log.problems:
        assert isinstance(problem, LogProblem)
        assert 1 <= problem.line_no <= n_lines, problem
        assert f"line {problem.line_no}," in str(problem)
        assert problem.field in ("start", "end", "name", "exposure", "ra", "dec", "fields")
        assert problem.reason_code and problem.message
    seen: list[tuple[int, int]] = []
    for e in log.entries:
        assert 0 <= e.start <= e.end
        assert 1 <= e.line_no <= n_lines
        assert e.name and e.kind in ("bias", "dark", "flat", "object")
        assert math.isfinite(e.exptime_s) and e.exptime_s >= 0
        if e.ra_deg is not None:
            assert 0 <= e.ra_deg < 360 and -90 <= e.dec_deg <= 90
        assert all(e.end < s or t < e.start for s, t in seen), "overlapping entries"
        seen.append((e.start, e.end))
        assert log.entry_for(e.start) is e and log.entry_for(e.end) is e
    problem_lines = {p.line_no for p in log.problems}
    assert not problem_lines & {e.line_no for e in log.entries}


@FUZZ
@given(st.lists(_line, max_size=12), _endings, st.booleans(), st.booleans())
def test_parse_log_on_log_like_text_keeps_its_contract(lines, eol, bom, gbk):
    text = eol.join(lines)
    data: bytes | str = text
    if gbk:
        try:
            data = text.encode("gb18030")
        except UnicodeEncodeError:
            data = text.encode("utf-8", "surrogatepass")
    elif bom:
        data = b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")
    log = parse_log(data, "fuzz.log")
    _check_log(log, data)


@FUZZ
@given(st.binary(max_size=600))
def test_parse_log_on_random_bytes_never_raises(data):
    _check_log(parse_log(data, "noise.log"), data)


@FUZZ
@given(st.lists(_line.filter(lambda s: "\r" not in s and "\n" not in s), min_size=1,
                max_size=8))
def test_line_endings_and_a_bom_do_not_change_what_a_log_says(lines):
    lf = parse_log("\n".join(lines) + "\n", "a.log")
    crlf = parse_log(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode("utf-8",
                                                                           "surrogatepass"),
                     "a.log")
    assert [e.fingerprint() for e in lf.entries] == [e.fingerprint() for e in crlf.entries]
    assert [(p.line_no, p.reason_code) for p in lf.problems] == [
        (p.line_no, p.reason_code) for p in crlf.problems]


# --------------------------------------------------------------------------- FITS headers

_key = st.one_of(st.sampled_from(["SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3",
                                  "PCOUNT", "GCOUNT", "EXTEND", "END", "FRAMENUM", "FILTER",
                                  "XTENSION", ""]),
                 st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8))
_value = st.one_of(st.integers(-10**12, 10**12).map(str), st.sampled_from(
    ["T", "F", "'IMAGE   '", "16", "-32", "0", "2", "999", "1000", "1e3", ""]),
    st.text(max_size=20))


@st.composite
def _header_blob(draw) -> bytes:
    cards = [b"SIMPLE  =                    T".ljust(80)] if draw(st.booleans()) else []
    for key, value in draw(st.lists(st.tuples(_key, _value), max_size=40)):
        card = f"{key:<8}= {value:>20}".encode("utf-8", "replace")
        cards.append(card[:80].ljust(80))
    if draw(st.booleans()):
        cards.append(b"END".ljust(80))
    blob = b"".join(cards)
    if draw(st.booleans()):
        blob = blob.ljust(-(-len(blob) // BLOCK) * BLOCK or BLOCK)
    return blob + draw(st.binary(max_size=3 * BLOCK))


@FUZZ
@given(_header_blob())
def test_check_complete_on_random_headers_never_raises(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fz") / "x.fits"
    path.write_bytes(blob)
    got = check_complete(path)
    assert got.reason in REASONS
    assert got.complete == (got.reason is None)
    if got.complete:  # bytes after the last HDU are tolerated, a short file never
        assert got.size == len(blob) >= got.expected_size
    assert got.message or got.complete


@FUZZ
@given(st.binary(max_size=4 * BLOCK))
def test_check_complete_on_random_bytes_never_raises(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fz") / "x.fits"
    path.write_bytes(blob)
    assert check_complete(path).reason in REASONS


@FUZZ
@given(st.sampled_from(["uint8", "int16", "uint16", "int32", "float32", "float64"]),
       st.lists(st.integers(0, 40), min_size=0, max_size=3), st.booleans(), st.data())
def test_a_valid_fits_is_complete_only_when_whole(tmp_path_factory, dtype, shape, ext, data):
    hdus = [fits.PrimaryHDU(np.zeros(shape, dtype) if shape else None)]
    if ext:
        hdus.append(fits.ImageHDU(np.ones((3, 5), "int16")))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    blob = buf.getvalue()
    cut = data.draw(st.integers(0, len(blob)))
    path = tmp_path_factory.mktemp("fz") / "x.fits"
    path.write_bytes(blob[:cut])
    got = check_complete(path)
    # A file cut exactly after the primary HDU is a whole one-HDU file.
    alone = io.BytesIO()
    fits.HDUList(hdus[:1]).writeto(alone)
    assert got.complete == (cut in (len(blob), len(alone.getvalue()) if ext else -1)), cut
    if cut == 0:
        assert got.reason == "empty"
    elif cut < BLOCK:
        assert got.reason == "partial_header"
    elif not got.complete:
        assert got.reason in ("truncated", "partial_header"), got


_header_value = st.one_of(
    st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
_filename = st.one_of(
    st.text(max_size=30).map(lambda s: s.replace("/", "_").replace("\x00", "") + ".fits"),
    st.sampled_from(["xl126g_0012.fits", "0012-r.fits", "xl126_i_7.fits.fz", "g.fits", ".fits",
                     "a_b_c_0001.fits", "frame٣.fits", "123456789012345678901234567890.fits"]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["FRAMENUM", "FRAMENO", "IMGNUM", "FILTER", "OTHER"]),
                       _header_value, max_size=5), _filename, st.booleans())
def test_frame_number_and_band_from_any_header_and_name(cards, name, with_header):
    header = fits.Header()
    for k, v in cards.items():
        try:
            header[k] = v
        except (ValueError, TypeError):
            continue  # astropy refuses it: no camera can write it either
    h = header if with_header else None
    number = frame_number_from(h, name)
    assert number is None or (isinstance(number, int) and number >= 0)
    band = band_from("/raw/night/" + name, h, CFG, "/raw")
    assert band is None or band in BANDS
    assert band_from(name, h, CFG, None) in (None, *BANDS)
