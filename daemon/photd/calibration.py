"""Master calibrations and the reduction of a frame (paper section 4.2).

The paper's recipe, with ``ccdproc``: two biases and two flats of the night
give the gain and read noise (photon transfer); all biases are averaged into
a master bias; flats are bias-subtracted and combined into a master flat;
science frames are bias-subtracted and flat-fielded. Darks are combined and
applied only when the camera's dark current is not negligible (the paper's
CCD has < 0.1 e-/px/s and skips them).

Numeric functions take arrays and return arrays or small dataclasses; they
touch no file, database or clock. The I/O edge is at the end of the module:
:func:`build_master` (read accepted frames, combine in bounded memory),
:func:`write_master` (atomic FITS with its inputs listed) and
:func:`read_master`. Which master a science frame uses is the daemon's
choice (it needs the store), not this module's.

Memory bound of a combine: the frames are combined in horizontal strips so
that the stack of one strip, with ccdproc's working copies, stays under
``CalibrationConfig.memory_limit_mb``; :func:`build_master` reads only the
strip from each file (FITS sections), so its peak memory is
that limit plus one frame (for the flat's per-frame level) plus the master,
whatever the number of inputs.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import ccdproc
import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.stats import sigma_clipped_stats
from scipy import ndimage, special

from .atomic import atomic_write
from .config import CalibrationConfig, CameraConfig
from .errors import FrameStop

CALIBRATION_KINDS = ("bias", "dark", "flat")

# Bytes of working memory per float32 value of the stack: the stack itself,
# ccdproc's CCDData copies and mask, and the sort/deviation copies that the
# median-based sigma clipping makes (measured ~3.6x the stack; keep a margin).
_BYTES_PER_STACK_VALUE = 4 * 7


class CalibrationError(FrameStop, ValueError):
    """A master cannot be built (no usable frame, shapes disagree ...).

    Attributes
    ----------
    reason : str
        Machine-readable reason (``no_frames``, ``shape_mismatch``,
        ``unreadable``) for the log and the frame state.
    """


@dataclass(frozen=True)
class FrameRejection:
    """Why a calibration frame is left out of the master.

    Attributes
    ----------
    reason : str
        Machine-readable: ``wrong_shape``, ``not_finite``, ``flat_too_faint``,
        ``flat_saturated``, ``outlier_level``, ``saturated``.
    message : str
        One human sentence carrying the evidence (the measured numbers).
    """

    reason: str
    message: str


class GainReadNoise(NamedTuple):
    """Detector gain and read noise from photon transfer."""

    gain_e_per_adu: float
    read_noise_e: float


# --------------------------------------------------------------------------- checks


def frame_stats(data_adu: np.ndarray, saturation_adu: float = 65000.0) -> dict[str, float]:
    """Robust level and noise of a frame.

    Parameters
    ----------
    data_adu : ndarray
        The frame (ADU).
    saturation_adu : float
        Pixels at or above this count as saturated (ADU).

    Returns
    -------
    dict
        ``median_adu`` and ``std_adu`` (3-sigma clipped, so stars and
        cosmic rays do not move them), ``saturated_fraction`` (0-1).
    """
    data = np.asarray(data_adu)
    # A sparse sample is enough for a level and a noise and keeps this cheap on
    # full frames (8.5 Mpx); every 7th pixel avoids locking onto column patterns.
    sample = data.ravel()[::7].astype(np.float32)
    _, median, std = _clipped_stats(sample)
    return {
        "median_adu": float(median),
        "std_adu": float(std),
        "saturated_fraction": float(np.count_nonzero(data >= saturation_adu) / data.size),
    }


def check_calibration_frame(
    kind: str,
    data_adu: np.ndarray,
    *,
    expected_shape: tuple[int, int],
    cfg: CalibrationConfig,
    cam: CameraConfig,
    siblings_median: float | None = None,
    bias_level_adu: float | None = None,
) -> FrameRejection | None:
    """Decide whether a calibration frame may go into the master.

    Parameters
    ----------
    kind : {"bias", "dark", "flat"}
        What the observing log says the frame is.
    data_adu : ndarray
        The raw frame (ADU), after overscan/trim if those are configured.
    expected_shape : (int, int)
        (ny, nx) the master must have.
    cfg, cam : CalibrationConfig, CameraConfig
        Thresholds (``flat_min_adu``, ``flat_max_adu``,
        ``outlier_level_adu``, ``max_saturated_fraction``) and the camera's
        ``saturation_adu``.
    siblings_median : float, optional
        Median level (ADU) of the frames of the same kind already accepted
        tonight. A bias or dark far from it has a light leak or a bad
        readout. Not used for flats: twilight levels change on purpose.
    bias_level_adu : float, optional
        Bias level (ADU) subtracted before comparing a flat with
        ``flat_min_adu``/``flat_max_adu``; when None the raw level is used.

    Returns
    -------
    FrameRejection or None
        None when the frame is fit for the master.
    """
    data = np.asarray(data_adu)
    if data.shape != tuple(expected_shape):
        return FrameRejection(
            "wrong_shape",
            f"{kind} frame is {data.shape[::-1]} px (nx, ny), "
            f"the master is {tuple(expected_shape)[::-1]}",
        )
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n = int(np.count_nonzero(~np.isfinite(data)))
        return FrameRejection("not_finite", f"{kind} frame has {n} NaN/inf pixels")
    stats = frame_stats(data, cam.saturation_adu)
    level = stats["median_adu"]
    if kind == "flat":
        signal = level - (bias_level_adu or 0.0)
        if signal < cfg.flat_min_adu:
            return FrameRejection(
                "flat_too_faint",
                f"flat level {signal:.0f} ADU is below flat_min_adu {cfg.flat_min_adu:.0f}",
            )
        if signal > cfg.flat_max_adu or stats["saturated_fraction"] > cfg.max_saturated_fraction:
            return FrameRejection(
                "flat_saturated",
                f"flat level {signal:.0f} ADU (limit {cfg.flat_max_adu:.0f}), "
                f"{100 * stats['saturated_fraction']:.2f} % of pixels at or above "
                f"{cam.saturation_adu:.0f} ADU",
            )
        return None
    if stats["saturated_fraction"] > cfg.max_saturated_fraction:
        return FrameRejection(
            "saturated",
            f"{kind} frame has {100 * stats['saturated_fraction']:.2f} % saturated pixels",
        )
    if siblings_median is not None and abs(level - siblings_median) > cfg.outlier_level_adu:
        return FrameRejection(
            "outlier_level",
            f"{kind} level {level:.1f} ADU is {level - siblings_median:+.1f} ADU from the "
            f"other {kind} frames ({siblings_median:.1f}); limit {cfg.outlier_level_adu:g}",
        )
    return None


# --------------------------------------------------------------------------- combining


def _strip_rows(n_frames: int, nx: int, mem_limit_mb: float) -> int:
    """Rows per strip so that a strip's stack and working copies fit the limit."""
    per_row = max(n_frames, 1) * nx * _BYTES_PER_STACK_VALUE
    return max(int(mem_limit_mb * 2**20 // per_row), 1)


def _combine_stack(stack: np.ndarray, *, method: str, sigma: float) -> np.ndarray:
    """Combine a (n, ny, nx) float32 stack with ccdproc, sigma-clipping first."""
    if stack.shape[0] == 1:
        return stack[0].copy()
    combiner = ccdproc.Combiner([CCDData(s, unit="adu") for s in stack], dtype=np.float32)
    # Clip around the median with a MAD width: a star or cosmic ray in one
    # frame would drag a mean/std centre towards itself. Three values cannot
    # define a width, so small stacks fall back to the plain median.
    # The names (not the functions) select astropy's C sigma clipping along
    # the stack axis, twice as fast on full frames as masked-array callables.
    if stack.shape[0] >= 4:
        combiner.sigma_clipping(
            low_thresh=sigma, high_thresh=sigma, func="median", dev_func="mad_std"
        )
    if method == "median" or stack.shape[0] < 4:
        out = combiner.median_combine(uncertainty_func=_no_uncertainty)
    else:
        out = combiner.average_combine(uncertainty_func=_no_uncertainty)
    return np.asarray(out.data, dtype=np.float32)


def _no_uncertainty(data: np.ndarray, axis: int = 0) -> np.ndarray:
    """Stand-in for ccdproc's per-pixel scatter of the inputs, which masters do not keep."""
    return np.zeros(np.shape(data)[1:], np.float32)


def combine_strips(
    read_strip: Callable[[int, slice], np.ndarray],
    n_frames: int,
    shape: tuple[int, int],
    *,
    method: str = "average",
    sigma: float = 3.0,
    mem_limit_mb: float = 512.0,
) -> np.ndarray:
    """Sigma-clipped combine of ``n_frames`` frames, one strip of rows at a time.

    Parameters
    ----------
    read_strip : callable
        ``read_strip(k, rows)`` returns rows ``rows`` of frame ``k`` as float
        (already bias-subtracted/scaled if that is wanted).
    n_frames : int
        Number of frames.
    shape : (int, int)
        (ny, nx) of every frame.
    method : {"average", "median"}
        Combination after clipping.
    sigma : float
        Clipping threshold, both sides (MAD-based standard deviations).
    mem_limit_mb : float
        Working-memory bound for one strip (MiB).

    Returns
    -------
    ndarray
        The combined frame, float32.
    """
    if n_frames < 1:
        raise CalibrationError("no_frames", "nothing to combine: no accepted frames")
    ny, nx = shape
    rows = _strip_rows(n_frames, nx, mem_limit_mb)
    out = np.empty((ny, nx), np.float32)
    for y0 in range(0, ny, rows):
        sl = slice(y0, min(y0 + rows, ny))
        stack = np.stack([np.asarray(read_strip(k, sl), np.float32) for k in range(n_frames)])
        out[sl] = _combine_stack(stack, method=method, sigma=sigma)
    return out


def _check_shapes(frames: Sequence[np.ndarray]) -> tuple[int, int]:
    if not frames:
        raise CalibrationError("no_frames", "nothing to combine: no accepted frames")
    shape = frames[0].shape
    for k, f in enumerate(frames):
        if f.shape != shape:
            raise CalibrationError("shape_mismatch", f"frame {k} is {f.shape}, frame 0 is {shape}")
    return shape


def robust_level(data: np.ndarray) -> float:
    """Sigma-clipped median of a frame (stars and cosmic rays excluded), same units."""
    sample = np.asarray(data).ravel()[::7]
    return float(_clipped_stats(sample)[1])


def _clipped_stats(sample: np.ndarray) -> tuple[float, float, float]:
    """3-sigma clipped mean, median and std of a 1-D sample.

    ``axis=0`` selects astropy's C clipping; without an axis it takes a
    slower pure-numpy path (same result).
    """
    return sigma_clipped_stats(sample, sigma=3.0, maxiters=5, axis=0)


def combine_bias(
    frames: Sequence[np.ndarray], *, sigma: float = 3.0, mem_limit_mb: float = 512.0
) -> np.ndarray:
    """Master bias: sigma-clipped average of bias frames.

    Parameters
    ----------
    frames : sequence of ndarray
        Raw bias frames (ADU), all the same shape.
    sigma : float
        Clipping threshold (cosmic rays hit biases during readout).
    mem_limit_mb : float
        Working-memory bound of the combine beyond the inputs (MiB).

    Returns
    -------
    ndarray
        Master bias (ADU, float32).
    """
    shape = _check_shapes(frames)
    return combine_strips(
        lambda k, sl: frames[k][sl], len(frames), shape, sigma=sigma, mem_limit_mb=mem_limit_mb
    )


def combine_dark(
    frames: Sequence[np.ndarray],
    master_bias: np.ndarray,
    exptimes_s: Sequence[float],
    *,
    sigma: float = 3.0,
    mem_limit_mb: float = 512.0,
) -> np.ndarray:
    """Master dark current: bias-subtracted darks per second, combined.

    Parameters
    ----------
    frames : sequence of ndarray
        Raw dark frames (ADU).
    master_bias : ndarray
        Master bias (ADU).
    exptimes_s : sequence of float
        Exposure time of each dark (s), all > 0.
    sigma, mem_limit_mb : float
        As for :func:`combine_bias`.

    Returns
    -------
    ndarray
        Dark current (ADU/s per pixel, float32). Use :func:`dark_is_significant`
        to decide whether to apply it.
    """
    shape = _check_shapes(frames)
    times = [float(t) for t in exptimes_s]
    if len(times) != len(frames) or min(times) <= 0:
        raise CalibrationError("bad_exptime", f"dark exposure times {times} must all be > 0")
    bias = np.asarray(master_bias, np.float32)
    return combine_strips(
        lambda k, sl: (frames[k][sl] - bias[sl]) / np.float32(times[k]),
        len(frames),
        shape,
        sigma=sigma,
        mem_limit_mb=mem_limit_mb,
    )


def dark_level_adu_per_s(
    paths: Sequence[str | os.PathLike[str]],
    master_bias: np.ndarray,
    exptimes_s: Sequence[float],
    cam: CameraConfig,
) -> float:
    """Typical dark current of raw dark frames, without combining them.

    Parameters
    ----------
    paths : sequence of path
        Raw dark frames.
    master_bias : ndarray
        Master bias (ADU), after overscan/trim.
    exptimes_s : sequence of float
        Exposure time of each frame (s).
    cam : CameraConfig
        Overscan/trim of the camera.

    Returns
    -------
    float
        Median over the frames of each frame's clipped median of
        (frame - bias) / exposure time (ADU/s per pixel); NaN when no frame has
        the master's shape and a positive exposure time. A cheap stand-in for
        the median of a combined master when deciding whether darks matter.
    """
    rates = []
    for p, t in zip(paths, exptimes_s, strict=True):
        data = apply_overscan_trim(read_frame(p)[0], cam)
        if t > 0 and data.shape == master_bias.shape:
            rates.append(robust_level(data - master_bias) / float(t))
    return float(np.median(rates)) if rates else float("nan")


def dark_is_significant(
    master_dark_adu_per_s: np.ndarray | float, *, gain_e_per_adu: float, cam: CameraConfig
) -> bool:
    """Whether dark correction is worth applying (paper: skipped below 0.1 e-/px/s).

    Parameters
    ----------
    master_dark_adu_per_s : ndarray or float
        From :func:`combine_dark` (ADU/s), or a typical level such as
        :func:`dark_level_adu_per_s` gives.
    gain_e_per_adu : float
        Detector gain (e-/ADU).
    cam : CameraConfig
        ``dark_current_e_per_s`` is the threshold (e-/px/s).

    Returns
    -------
    bool
        True when the typical (median) dark current exceeds the threshold.
        Hot pixels alone do not make it significant: they are better masked.
    """
    level_e_per_s = float(np.median(master_dark_adu_per_s)) * gain_e_per_adu
    return level_e_per_s > cam.dark_current_e_per_s


def combine_flat(
    frames: Sequence[np.ndarray],
    master_bias: np.ndarray,
    *,
    sigma: float = 3.0,
    mem_limit_mb: float = 512.0,
    master_dark_adu_per_s: np.ndarray | None = None,
    exptimes_s: Sequence[float] | None = None,
) -> np.ndarray:
    """Master flat: bias-subtracted flats, each normalised, clipped, combined, mean 1.

    Parameters
    ----------
    frames : sequence of ndarray
        Raw flat frames (ADU).
    master_bias : ndarray
        Master bias (ADU).
    sigma : float
        Clipping threshold: sky flats catch stars and cosmic rays, which
        must not print through into the master.
    mem_limit_mb : float
        Working-memory bound beyond the inputs (MiB).
    master_dark_adu_per_s, exptimes_s : optional
        Dark current (ADU/s) and flat exposure times (s), when darks apply.

    Returns
    -------
    ndarray
        Relative response (float32, mean 1 over the frame).
    """
    shape = _check_shapes(frames)
    bias = np.asarray(master_bias, np.float32)

    def reduced(k: int, sl: slice | None = None) -> np.ndarray:
        sl = slice(None) if sl is None else sl
        out = frames[k][sl] - bias[sl]
        if master_dark_adu_per_s is not None and exptimes_s is not None:
            out = out - master_dark_adu_per_s[sl] * np.float32(exptimes_s[k])
        return out

    levels = [robust_level(reduced(k)) for k in range(len(frames))]
    return _finish_flat(
        combine_strips(
            lambda k, sl: reduced(k, sl) / np.float32(levels[k]),
            len(frames),
            shape,
            sigma=sigma,
            mem_limit_mb=mem_limit_mb,
        ),
        levels,
    )


def _finish_flat(combined: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    if min(levels) <= 0:
        raise CalibrationError("flat_too_faint", f"flat levels {levels} ADU: not all > 0")
    mean = float(np.mean(combined, dtype=np.float64))
    return (combined / np.float32(mean)).astype(np.float32)


# --------------------------------------------------------------------------- gain


def _clipped_variance(values: np.ndarray, sigma: float) -> float:
    """Variance of the Gaussian core after clipping outliers (stars, cosmics).

    Clipping at +-k sigma also removes the Gaussian's own tails, which
    lowers the variance by a known factor; undo it, or the gain would come
    out ~1 % high for k = 4 and ~3 % for k = 3.
    """
    _, _, std = sigma_clipped_stats(
        values, sigma=sigma, maxiters=10, cenfunc="median", stdfunc="std"
    )
    k = sigma
    kept = special.erf(k / math.sqrt(2.0))
    phi = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
    factor = 1.0 - 2.0 * k * phi / kept
    return float(std) ** 2 / factor


def _central_box(shape: tuple[int, int], fraction: float) -> tuple[slice, slice]:
    ny, nx = shape
    hy, hx = int(ny * fraction / 2), int(nx * fraction / 2)
    return slice(ny // 2 - hy, ny // 2 + hy), slice(nx // 2 - hx, nx // 2 + hx)


def gain_readnoise(
    bias1: np.ndarray,
    bias2: np.ndarray,
    flat1: np.ndarray,
    flat2: np.ndarray,
    *,
    box_fraction: float = 0.6,
    sigma: float = 3.0,
) -> GainReadNoise:
    """Gain and read noise from two biases and two flats (Janesick photon transfer).

    Difference images cancel the fixed patterns (bias structure, pixel
    response non-uniformity). The second flat is scaled to the first
    before differencing, because twilight flats are taken at different
    levels and an unscaled difference would keep ``PRNU x level change``.
    With ``f = flat - mean(bias1, bias2)``, ``r = <f1>/<f2>`` and
    ``D = f1 - r f2``::

        var(B1 - B2) = 2 sigma^2
        var(D)       = (<f1> + r^2 <f2>) / g + (1 + r^2) sigma^2

    Parameters
    ----------
    bias1, bias2 : ndarray
        Two raw bias frames (ADU).
    flat1, flat2 : ndarray
        Two raw flat frames (ADU), well exposed, below non-linearity.
    box_fraction : float
        Side of the central box used, as a fraction of each axis (the
        corners are vignetted and may hold gradients).
    sigma : float
        Clipping threshold of the difference images; the variance is
        corrected for the clipped Gaussian tails. 3 rather than 4-5: the
        wings of stars in sky flats survive a looser clip and pushed the gain
        0.5-1 % low on simulated nights, where 3 is unbiased to 0.1 %.

    Returns
    -------
    GainReadNoise
        ``gain_e_per_adu`` (e-/ADU) and ``read_noise_e`` (e- rms).
    """
    box = _central_box(np.shape(bias1), box_fraction)
    b1 = np.asarray(bias1, np.float64)[box]
    b2 = np.asarray(bias2, np.float64)[box]
    bias = 0.5 * (b1 + b2)
    f1 = np.asarray(flat1, np.float64)[box] - bias
    f2 = np.asarray(flat2, np.float64)[box] - bias
    var_bias_diff = _clipped_variance((b1 - b2).ravel(), sigma)
    m1 = float(sigma_clipped_stats(f1, sigma=3.0, maxiters=5)[1])
    m2 = float(sigma_clipped_stats(f2, sigma=3.0, maxiters=5)[1])
    r = m1 / m2
    # f1 and r f2 share the averaged bias, whose noise cancels except for a
    # (1 - r) share; that leftover is (1 - r)^2 sigma^2 / 2, negligible.
    var_diff = _clipped_variance((f1 - r * f2).ravel(), sigma)
    read_var = var_bias_diff / 2.0
    shot = var_diff - (1.0 + r * r) * read_var
    if shot <= 0 or m1 <= 0 or m2 <= 0:
        raise CalibrationError(
            "no_photon_signal",
            f"flats at {m1:.0f} and {m2:.0f} ADU above bias show no photon noise "
            f"(difference variance {var_diff:.1f} ADU^2, read {read_var:.1f} ADU^2)",
        )
    gain = (np.mean(f1) + r * r * np.mean(f2)) / shot
    return GainReadNoise(float(gain), float(gain * math.sqrt(read_var)))


def gain_readnoise_pairs(
    biases: Sequence[np.ndarray], flats: Sequence[np.ndarray], **kwargs: float
) -> GainReadNoise:
    """Gain and read noise averaged over consecutive pairs of biases and flats.

    Parameters
    ----------
    biases, flats : sequence of ndarray
        At least two of each (ADU); pairs are (0, 1), (2, 3), ...
    **kwargs
        Passed to :func:`gain_readnoise`.

    Returns
    -------
    GainReadNoise
        Median over the pairs (robust to one pair with a bad flat).
    """
    n = min(len(biases), len(flats)) // 2
    if n < 1:
        raise CalibrationError(
            "no_frames", f"need two biases and two flats, have {len(biases)} and {len(flats)}"
        )
    results = [
        gain_readnoise(biases[2 * k], biases[2 * k + 1], flats[2 * k], flats[2 * k + 1], **kwargs)
        for k in range(n)
    ]
    return GainReadNoise(
        float(np.median([g for g, _ in results])), float(np.median([s for _, s in results]))
    )


# --------------------------------------------------------------------------- reduction

_SECTION = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")


def parse_section(section: str) -> tuple[slice, slice]:
    """FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) to numpy (rows, cols) slices."""
    m = _SECTION.match(section.strip())
    if not m:
        raise ValueError(f"section {section!r} is not of the form [x1:x2,y1:y2]")
    x1, x2, y1, y2 = (int(v) for v in m.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise ValueError(f"section {section!r}: need 1 <= x1 <= x2 and 1 <= y1 <= y2")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def apply_overscan_trim(
    data_adu: np.ndarray,
    cam: CameraConfig | None = None,
    *,
    overscan: str = "",
    trim: str = "",
) -> np.ndarray:
    """Subtract the overscan level and trim to the light-sensitive area.

    Parameters
    ----------
    data_adu : ndarray
        Raw frame (ADU).
    cam : CameraConfig, optional
        Supplies ``overscan`` and ``trim`` (FITS sections; "" = none).
    overscan, trim : str
        Used when ``cam`` is None.

    Returns
    -------
    ndarray
        float32 frame; with neither section configured, the frame unchanged
        apart from the type.
    """
    if cam is not None:
        overscan, trim = cam.overscan, cam.trim
    data = np.asarray(data_adu, np.float32)
    if overscan:
        rows, cols = parse_section(overscan)
        region = data[rows, cols]
        # A strip of columns is read row by row: subtract one level per row
        # (median: cosmic rays hit the overscan too); a strip of rows, per column.
        if region.shape[1] <= region.shape[0]:
            data = (
                data - np.median(region, axis=1)[:, None]
                if region.shape[0] == data.shape[0]
                else data - np.float32(np.median(region))
            )
        else:
            data = (
                data - np.median(region, axis=0)[None, :]
                if region.shape[1] == data.shape[1]
                else data - np.float32(np.median(region))
            )
    if trim:
        rows, cols = parse_section(trim)
        data = data[rows, cols]
    return np.ascontiguousarray(data, np.float32)


def saturation_mask(
    data_adu: np.ndarray,
    saturation_adu: float,
    nonlinearity_adu: float | None = None,
    grow_px: int = 1,
) -> np.ndarray:
    """Pixels at or above saturation (or the non-linearity limit), grown by ``grow_px``.

    Growing catches the neighbours of a saturated core, where charge has
    bled or the response is already non-linear.
    """
    limit = saturation_adu if nonlinearity_adu is None else min(saturation_adu, nonlinearity_adu)
    mask = np.asarray(data_adu) >= limit
    if grow_px > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=grow_px)
    return mask


def calibrate(
    data_adu: np.ndarray,
    *,
    master_bias: np.ndarray,
    exptime_s: float,
    saturation_adu: float,
    master_flat: np.ndarray | None = None,
    master_dark: np.ndarray | None = None,
    nonlinearity_adu: float | None = None,
    overscan: str = "",
    trim: str = "",
    min_flat: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Bias-subtract, dark-scale and flat-field one raw frame.

    Parameters
    ----------
    data_adu : ndarray
        Raw frame (ADU), untouched: saturation is judged on raw counts.
    master_bias : ndarray
        Master bias (ADU), already overscan-subtracted/trimmed like the frame.
    exptime_s : float
        Exposure time (s), scales the dark.
    saturation_adu : float
        Raw level at which the ADC or the well saturates (ADU).
    master_flat : ndarray, optional
        Relative response (mean 1); None skips flat-fielding.
    master_dark : ndarray, optional
        Dark current (ADU/s) from :func:`combine_dark`; None skips it (the
        paper's default: dark current is negligible).
    nonlinearity_adu : float, optional
        Raw level above which the response is no longer linear; masked too.
    overscan, trim : str
        FITS sections, "" = none (``CameraConfig.overscan``/``trim``).
    min_flat : float
        Flat values below this are dead or vignetted out: masked, not divided.

    Returns
    -------
    calibrated_adu : ndarray
        float32, bias/dark-subtracted and flat-fielded (ADU; times the gain
        gives electrons).
    mask : ndarray
        bool, True where the value must not be trusted (saturated or
        non-linear pixels and their neighbours, dead flat pixels).
    """
    mask = saturation_mask(data_adu, saturation_adu, nonlinearity_adu)
    data = apply_overscan_trim(data_adu, overscan=overscan, trim=trim)
    if trim:
        rows, cols = parse_section(trim)
        mask = mask[rows, cols]
    bias = np.asarray(master_bias, np.float32)
    if bias.shape != data.shape:
        raise CalibrationError(
            "shape_mismatch", f"frame is {data.shape}, master bias is {bias.shape}"
        )
    out = data - bias
    if master_dark is not None:
        out -= np.asarray(master_dark, np.float32) * np.float32(exptime_s)
    if master_flat is not None:
        flat = np.asarray(master_flat, np.float32)
        if flat.shape != out.shape:
            raise CalibrationError(
                "shape_mismatch", f"frame is {out.shape}, master flat is {flat.shape}"
            )
        dead = ~(flat >= min_flat)  # also catches NaN
        out /= np.where(dead, np.float32(1.0), flat)
        mask |= dead
    return out.astype(np.float32, copy=False), mask


# --------------------------------------------------------------------------- I/O edge


@dataclass
class MasterResult:
    """A freshly combined master and what went into it."""

    kind: str
    data: np.ndarray  # bias ADU, dark ADU/s, flat relative (mean 1); float32
    inputs: list[str]  # accepted frame paths, in order
    rejected: dict[str, FrameRejection] = field(default_factory=dict)  # path -> why


def _open_image(path: str | os.PathLike[str]) -> fits.HDUList:
    try:
        # No memmap: astropy refuses to memory-map scaled (BZERO) integer
        # images, and ``section`` reads only the rows asked for without it.
        return fits.open(path, memmap=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError("unreadable", f"{path}: cannot read FITS ({exc})") from exc


def _image_hdu(hdul: fits.HDUList, path: str | os.PathLike[str]):
    for hdu in hdul:
        if hdu.is_image and hdu.header.get("NAXIS", 0) == 2:
            return hdu
    raise CalibrationError("unreadable", f"{path}: no 2-D image")


def read_frame(path: str | os.PathLike[str]) -> tuple[np.ndarray, fits.Header]:
    """Read a raw or master frame's image (float32) and header."""
    with _open_image(path) as hdul:
        hdu = _image_hdu(hdul, path)
        return np.array(hdu.data, np.float32), hdu.header.copy()


def build_master(
    kind: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    cfg: CalibrationConfig,
    cam: CameraConfig,
    expected_shape: tuple[int, int] | None = None,
    master_bias: np.ndarray | None = None,
    exptimes_s: Sequence[float] | None = None,
) -> MasterResult:
    """Check the night's frames of one band and kind and combine the good ones.

    Called each time a calibration frame arrives, with every frame of that
    night/band/kind so far: the master is rebuilt from all of them (10 small
    frames take well under a second; see the module notes for full size).

    Parameters
    ----------
    kind : {"bias", "dark", "flat"}
    paths : sequence of path
        The frames, in arrival order.
    cfg, cam : CalibrationConfig, CameraConfig
    expected_shape : (int, int), optional
        (ny, nx) after trim; default the first frame's.
    master_bias : ndarray
        Required for darks and flats (ADU).
    exptimes_s : sequence of float
        Required for darks: exposure time of each path (s).

    Returns
    -------
    MasterResult
        The master, the accepted inputs and the rejected ones with reasons.

    Raises
    ------
    CalibrationError
        ``no_frames`` when no frame is accepted.
    """
    if kind not in CALIBRATION_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {CALIBRATION_KINDS}")
    if kind in ("dark", "flat") and master_bias is None:
        raise CalibrationError("no_bias", f"a master {kind} needs a master bias")
    bias = None if master_bias is None else np.asarray(master_bias, np.float32)
    bias_level = None if bias is None else float(np.median(bias))
    accepted: list[tuple[str, float, float]] = []  # path, level, exptime
    rejected: dict[str, FrameRejection] = {}
    levels: list[float] = []
    for k, p in enumerate(paths):
        data, _ = read_frame(p)
        data = apply_overscan_trim(data, cam)
        shape = expected_shape or (bias.shape if bias is not None else data.shape)
        expected_shape = shape
        siblings = float(np.median(levels)) if levels else None
        why = check_calibration_frame(
            kind,
            data,
            expected_shape=shape,
            cfg=cfg,
            cam=cam,
            siblings_median=siblings,
            bias_level_adu=bias_level,
        )
        if why is not None:
            rejected[str(p)] = why
            continue
        exptime = float(exptimes_s[k]) if exptimes_s is not None else 0.0
        if kind == "flat":
            level = robust_level(data - bias)
        else:
            level = frame_stats(data, cam.saturation_adu)["median_adu"]
            levels.append(level)
        accepted.append((str(p), level, exptime))
        del data
    if not accepted:
        raise CalibrationError(
            "no_frames",
            f"no {kind} frame accepted out of {len(paths)} "
            f"({', '.join(sorted({r.reason for r in rejected.values()})) or 'none given'})",
        )
    files = [_open_image(p) for p, _, _ in accepted]
    try:
        hdus = [_image_hdu(h, p) for h, (p, _, _) in zip(files, accepted, strict=True)]
        trim_rows, trim_cols = parse_section(cam.trim) if cam.trim else (slice(None),) * 2

        def strip(k: int, sl: slice) -> np.ndarray:
            # Read only the strip's rows from the file (a FITS section), so
            # memory does not grow with the number of inputs.
            if cam.overscan:
                raw = apply_overscan_trim(hdus[k].data, cam)[sl]
            else:
                full_rows = range(*trim_rows.indices(hdus[k].shape[0]))[sl]
                raw = np.asarray(
                    hdus[k].section[full_rows.start : full_rows.stop, trim_cols], np.float32
                )
            if kind == "bias":
                return raw
            reduced = raw - bias[sl]
            if kind == "dark":
                return reduced / np.float32(accepted[k][2])
            return reduced / np.float32(accepted[k][1])

        combined = combine_strips(
            strip,
            len(accepted),
            expected_shape,
            sigma=cfg.combine_sigma,
            mem_limit_mb=cfg.memory_limit_mb,
        )
    finally:
        for h in files:
            h.close()
    if kind == "flat":
        combined = _finish_flat(combined, [lvl for _, lvl, _ in accepted])
    return MasterResult(kind, combined, [p for p, _, _ in accepted], rejected)


def write_master(
    path: str | os.PathLike[str],
    data: np.ndarray,
    *,
    kind: str,
    band: str,
    night: str,
    version: int,
    inputs: Sequence[str | os.PathLike[str]],
    extra: dict[str, tuple[object, str]] | None = None,
) -> Path:
    """Write a master as FITS atomically, its inputs and version in the header.

    The file appears under ``path`` complete or not at all: it is written
    to a temporary name in the same folder, flushed, fsynced and renamed.

    Parameters
    ----------
    path : path
        Destination (its folder is created).
    data : ndarray
        The master (float32).
    kind, band, night : str
        ``MASTER``, ``FILTER`` and ``NIGHT`` cards.
    version : int
        ``MVERSION`` card (the store's version of this night/band/kind).
    inputs : sequence of path
        Listed as ``NINPUTS``, ``INPUTnnn`` (file name) and HISTORY (full path).
    extra : dict, optional
        More cards, ``{KEY: (value, comment)}`` (e.g. ``GAIN``, ``RDNOISE``).

    Returns
    -------
    Path
        ``path``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hdr = fits.Header()
    hdr["MASTER"] = (kind, "master calibration kind")
    hdr["FILTER"] = (band, "band (camera)")
    hdr["NIGHT"] = (night, "night of observation")
    hdr["MVERSION"] = (int(version), "master version for this night/band/kind")
    hdr["BUNIT"] = ({"bias": "adu", "dark": "adu/s", "flat": ""}.get(kind, ""), "")
    hdr["NINPUTS"] = (len(inputs), "number of frames combined")
    for k, p in enumerate(inputs[:999], 1):
        hdr[f"INPUT{k:03d}"] = (Path(p).name[:68], "input frame")
    for p in inputs:
        hdr.add_history(f"input: {p}")
    for key, (value, comment) in (extra or {}).items():
        hdr[key] = (value, comment)
    hdu = fits.PrimaryHDU(np.asarray(data, np.float32), header=hdr)
    return atomic_write(dest, hdu.writeto)


def read_master(path: str | os.PathLike[str]) -> tuple[np.ndarray, fits.Header]:
    """Read a master written by :func:`write_master`: float32 data and header."""
    return read_frame(path)
