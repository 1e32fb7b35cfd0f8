"""Flag bits of measurement and light-curve rows: one list, read by the store and the readers.

The modules that set a bit keep their own named constant (``photometry.EDGE``
...); a test checks that every one of them is listed here with the same value.
"""

from __future__ import annotations

#: bit value -> (name, meaning). Bits up to 128 are set per measurement by the
#: photometry; 256 and above on light-curve rows.
FLAGS: dict[int, tuple[str, str]] = {
    1: ("edge", "the aperture crosses the frame edge"),
    2: ("saturated", "a saturated or bad pixel inside the aperture"),
    4: ("neighbour", "neighbours put more than photometry.neighbour_max_contamination "
                     "of the light in the aperture"),
    8: ("cosmic_ray", "a cosmic-ray hit inside the aperture (pixels replaced)"),
    16: ("no_centroid", "bright enough to centroid, but the centroid failed or ran away"),
    32: ("bad_sky", "too few clean annulus pixels for a trustworthy sky"),
    64: ("nonpositive_flux", "flux <= 0: no magnitude"),
    128: ("off_frame", "the target is not on this frame (row kept, values NaN)"),
    256: ("few_comparisons", "fewer comparison stars than photometry.comparison_min_stars"),
    512: ("relative_wcs", "no catalog covers the field: registered to the night's first frame "
                          "of the field, no calibrated magnitude"),
    1024: ("provisional_calibration", "calibrated with provisional masters (an earlier "
                                      "night's or none yet)"),
    2048: ("target_ambiguous", "two detections were about equally near the target's position: "
                               "measured at the position given, not on a detection"),
    4096: ("target_not_found", "no detection within photometry.target_search_arcsec of the "
                               "target's position: measured there, possibly blank sky"),
}


TARGET_AMBIGUOUS = 2048
TARGET_NOT_FOUND = 4096


def decode(flags: int) -> list[str]:
    """The names of the bits set in ``flags`` (lowest first)."""
    return [name for bit, (name, _meaning) in sorted(FLAGS.items()) if int(flags) & bit]
