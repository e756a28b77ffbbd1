"""Tissue detection on a low-resolution image of a slide.

A pixel is tissue when it is coloured (HSV saturation above an Otsu threshold that is clamped
to an absolute range, and optical density above a floor) or stained however pale (summed optical
density above the glass's own, :func:`stain_od`), its colour is one that H&E can make
(not red, green, blue or black marker ink, judged by ratios of optical density), and it
survives a morphological clean-up (closing, removal of small specks, filling of small holes).
The method, its parameters and its measured accuracy are in docs/tissue.md.

The array functions are written once for NumPy and CuPy: the namespace comes from the input
(``array_namespace``) and the image operations from skimage/scipy.ndimage or
cucim.skimage/cupyx.scipy.ndimage (:mod:`nic_pipeline.arrays`), so CPU tests exercise the code that
runs on the GPU.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np

from nic_pipeline.runtime.arrays import array_namespace, ndimage, skimage, to_numpy
from nic_pipeline.errors import SlideError

DEFAULT_MASK_MPP = 8.0
"""µm per pixel of the tissue mask (and the resolution ``tissue_mask`` assumes by default)."""

# Foreground (coloured, not white) thresholds. Saturation is HSV S = (max - min) / max.
MIN_SATURATION = 0.05  # absolute floor: glass/background stays below it (near-white guard)
MAX_SATURATION = 0.10  # absolute ceiling: pale tissue is above it even if Otsu splits tissue
MIN_OD = 0.05  # mean optical density floor, -ln((I+1)/256): I > ~242 is background
# Pale or low-saturation stain: optical density above the glass (I0 = the glass's own colour),
# summed over the channels. Saturation alone misses faded slides and the lace of fat.
MIN_STAIN_OD = 0.30  # summed OD above the glass: stain however unsaturated (glass noise < 0.08; 0.2 takes ink edges)
GLASS_NOISE_K = 6.0  # ... and above the glass median + this many robust SDs of the glass's summed OD
GLASS_SAMPLE = 2**18  # the glass is measured on a regular sample of about this many pixels

# Marker ink: H&E absorbs green most. Green/blue ink absorbs red more than green, red ink
# absorbs blue about as much as green (eosin transmits blue). Ratios of optical density.
PEN_RED_OVER_GREEN = 1.0  # OD_R / OD_G above this: green or blue ink
PEN_BLUE_OVER_GREEN = 0.75  # OD_B / OD_G above this: red ink, if it also absorbs little red
PEN_RED_MAX_R = 0.3  # ... (OD_R / OD_G below this: no haematoxylin in it) or is dark:
PEN_RED_DARK_OD = 0.9  # ... mean OD above this
PEN_RED_EXTRA = 0.05  # OD_B / OD_G above PEN_BLUE_OVER_GREEN + this: red ink whatever else, on
PEN_CONFIRM = 0.5  # ... an image with at least this many times as many pixels of ink by the other rules
PEN_STRICT_RED_OVER_GREEN = 1.3  # the same rules on unsmoothed OD, for thin lines
PEN_STRICT_BLUE_OVER_GREEN = 0.85
PEN_STRICT_MIN_OD = 0.3  # ... on pixels this dark: ink lines are dense, pale membranes are not
GLASS_MAX_OD = 0.15  # glass is brighter than this (I > ~220)
PEN_MIN_OD = 0.15  # ratios are noise below this mean OD
PEN_MAX_OD = 2.0  # darker than this (< 14 % of light through) is thick ink, not tissue
PEN_MIN_UM2 = 2_000.0  # thin-line ink components smaller than this are stain noise, not ink
PEN_SMOOTH_UM = 16.0  # Gaussian sigma on OD before the ratios: judges regions, not pixel noise
PEN_MARGIN_UM = 16.0  # pen masks are grown by this much to take the blended ink edges

# Second opinion on a slide's mask: the share of the image whose summed OD above the glass passes
# this plain threshold. A mask far below it (pale stain or a stain taken for ink) is warned about.
SECOND_OPINION_OD = 0.3
SECOND_OPINION_RATIO = 0.5  # warn when the mask holds less than this share of what the threshold sees
SECOND_OPINION_MIN = 0.02  # ... and the threshold sees at least this share of the image

# Morphology, in µm so it means the same at any resolution.
CLOSING_UM = 16.0  # radius of the closing disk: joins tissue split by a pixel or two of gap
MIN_OBJECT_UM2 = 10_000.0  # 0.01 mm², about 100 x 100 µm: smaller specks are dust or debris
MAX_HOLE_UM2 = 20_000.0  # holes smaller than this (vessels, fat cells) count as tissue


def _remove_small(func, mask, n_px: int):
    """Call remove_small_objects/holes removing components of fewer than ``n_px`` pixels.

    skimage >= 0.26 (and cucim 26) take ``max_size`` (removes size <= max_size); older
    versions take ``min_size``/``area_threshold`` (removes size < threshold).
    """
    if n_px <= 1:
        return mask
    if "max_size" in inspect.signature(func).parameters:
        return func(mask, max_size=n_px - 1)
    return func(mask, n_px)


# --- per-pixel measures ---------------------------------------------------------------------------


_OD_TABLE = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)
"""The optical density of each uint8 intensity: a table lookup costs a fraction of a logarithm."""


def optical_density(rgb):
    """Optical density -ln((I + 1) / 256) per channel, float32 (h, w, 3); 0 for white."""
    xp = array_namespace(rgb)
    rgb = rgb[..., :3]
    if rgb.dtype == xp.uint8:
        return xp.asarray(_OD_TABLE)[rgb]
    return -xp.log((rgb.astype(xp.float32) + 1.0) / 256.0)


def saturation(rgb):
    """HSV saturation (max - min) / max of a uint8 RGB image, float32 (h, w); 0 for grey."""
    xp = array_namespace(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # elementwise max/min of the three planes: a reduction over a last axis of 3 is several times slower
    hi = xp.maximum(xp.maximum(r, g), b).astype(xp.float32)  # before the cast: a third of the conversions
    lo = xp.minimum(xp.minimum(r, g), b).astype(xp.float32)
    return (hi - lo) / xp.maximum(hi, 1.0)


def channel_mean(image):
    """Mean over the last axis of an (h, w, 3) float image, as ``image.mean(axis=-1)`` computes it
    (((c0 + c1) + c2) / 3 in the image's precision), but without a slow 3-long reduction."""
    return (image[..., 0] + image[..., 1] + image[..., 2]) / image.dtype.type(3)


def pen_mask(rgb, mpp: float = DEFAULT_MASK_MPP, od=None, sat=None, glass=None):
    """Pixels whose colour H&E cannot make: red, green, blue or black marker ink (bool (h, w)).

    H&E absorbs green light most (haematoxylin purple, eosin pink). Green and blue inks absorb
    red more than green (OD_R / OD_G > 1.0). Red ink absorbs blue nearly as much as green:
    OD_B / OD_G > 0.8 (on an image that has ink by the other rules: :func:`_ink`), or > 0.75
    where it also absorbs little red (OD_R / OD_G < 0.3, no
    haematoxylin) or is dark (mean OD > 0.9); H&E tissue on the fixtures stays at 0.45-0.7,
    eosin-rich tissue with a blue-absorbing eosin up to ~0.78. Thick ink of any colour is
    darker than tissue at low resolution (mean OD > 2). The glass OD
    (:func:`glass_od`) is subtracted first. These rules are applied to OD smoothed over
    PEN_SMOOTH_UM (regions, not pixel noise), and stricter ones (ratios 1.3 / 0.85, mean
    OD > 0.3) to the raw OD to catch thin lines, keeping only raw-rule components of at least
    PEN_MIN_UM2. Only pixels with mean OD > PEN_MIN_OD are judged. ``mpp``: µm/px of ``rgb``.
    """
    xp = array_namespace(rgb)
    if od is None:
        od = optical_density(rgb)
    od = xp.maximum(od - (glass_od(rgb, od, sat) if glass is None else glass), 0.0)
    pen = _ink(od, PEN_RED_OVER_GREEN, PEN_BLUE_OVER_GREEN)
    sigma = PEN_SMOOTH_UM / mpp
    if sigma >= 0.5:
        thin = _ink(od, PEN_STRICT_RED_OVER_GREEN, PEN_STRICT_BLUE_OVER_GREEN, PEN_STRICT_MIN_OD)
        thin = _remove_small(skimage(xp, "morphology").remove_small_objects, thin, int(PEN_MIN_UM2 / mpp**2))
        smooth = ndimage(xp).gaussian_filter(od, sigma=(sigma, sigma, 0), mode="nearest")
        pen = _ink(smooth, PEN_RED_OVER_GREEN, PEN_BLUE_OVER_GREEN) | thin
    return pen


def stain_od(rgb, od=None, sat=None, glass=None):
    """Summed optical density above the glass, sum over channels of max(OD - OD_glass, 0),
    float32 (h, w): how much light the stain takes, whatever its hue or saturation. ``glass``:
    the glass OD (:func:`glass_od`), estimated here when not given."""
    xp = array_namespace(rgb)
    if od is None:
        od = optical_density(rgb)
    if glass is None:
        glass = glass_od(rgb, od, sat)
    excess = xp.maximum(od - glass, 0.0)
    return excess[..., 0] + excess[..., 1] + excess[..., 2]


def glass_od(rgb, od=None, sat=None):
    """OD (3,) of the glass: median over bright, unsaturated pixels (0 if too few of them).

    Subtracted before judging colours, so that pale tissue on tinted glass is judged by its
    stain and not by the tint of the glass. ``od`` and ``sat`` (unfiltered saturation) are
    computed here when not given.
    """
    return _glass(rgb, od, sat)[0]


def _glass(rgb, od=None, sat=None):
    """(glass OD (3,), threshold on the summed OD above the glass that glass stays under).

    The glass (the slide's brightest mode: I0 of OD = -ln(I / I0)) is the bright, unsaturated
    pixels; the threshold is MIN_STAIN_OD, raised to the glass's median + GLASS_NOISE_K robust
    SDs (1.4826 MAD) of its summed OD on noisy glass. Without enough glass (tissue fills the
    image) the glass is white (OD 0) and the threshold MIN_STAIN_OD.
    """
    xp = array_namespace(rgb)
    if od is None:
        od = optical_density(rgb)
    if sat is None:
        sat = saturation(rgb)
    step = max(1, int(math.sqrt(sat.size / GLASS_SAMPLE)))  # medians of a regular sample: a 3,000² image
    od, sat = od[::step, ::step], sat[::step, ::step]      # takes 1/9 of the time, images <= 512² all
    glass = (sat < MIN_SATURATION) & (channel_mean(od) < GLASS_MAX_OD)
    if int(glass.sum()) < max(16, glass.size // 100):
        return xp.zeros(3, dtype=od.dtype), MIN_STAIN_OD
    pixels = od[glass]
    g = xp.median(pixels, axis=0).astype(od.dtype)
    excess = xp.maximum(pixels - g, 0.0)
    excess = excess[:, 0] + excess[:, 1] + excess[:, 2]
    spread = 1.4826 * float(xp.median(xp.abs(excess - xp.median(excess))))
    return g, max(MIN_STAIN_OD, float(xp.median(excess)) + GLASS_NOISE_K * spread)


def _ink(od, red_over_green: float, blue_over_green: float, min_od: float = PEN_MIN_OD):
    """The per-pixel ink rules on an OD image (see :func:`pen_mask`), the ambiguous one only on an
    image that has ink.

    Red ink and eosin-rich tissue stained with a blue-absorbing eosin can have the same OD_B / OD_G
    (0.8-0.95, e.g. the red ink of ``no-tissue-red-pen`` and whole synthetic slides): a pixel with
    OD_B / OD_G above ``blue_over_green + PEN_RED_EXTRA`` but none of the other signs of ink (little
    red absorbed, dark) is ink only where the image has, by the other rules, at least PEN_CONFIRM
    times as much ink as it has such pixels (the blended and pale parts of strokes). Where it has
    not, they are the slide's own stain.
    """
    xp = array_namespace(od)
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    mean = channel_mean(od)
    g = xp.maximum(g, 1e-3)
    judged = mean > min_od
    red_hue = (r < PEN_RED_MAX_R * g) | (mean > PEN_RED_DARK_OD)
    sure = judged & ((r > red_over_green * g) | ((b > blue_over_green * g) & red_hue) | (mean > PEN_MAX_OD))
    maybe = judged & (b > (blue_over_green + PEN_RED_EXTRA) * g)
    if int(sure.sum()) >= PEN_CONFIRM * int(maybe.sum()):
        return sure | maybe
    return sure


def _saturation_threshold(sat, valid) -> float:
    """Otsu's threshold on saturation, clamped to [MIN_SATURATION, MAX_SATURATION].

    The floor stops Otsu from splitting the noise of a near-uniform white image; the ceiling
    stops it from splitting pale from dark tissue when tissue fills the image.
    """
    xp = array_namespace(sat)
    values = sat[valid] if valid is not None else sat.ravel()
    if values.size == 0 or float(values.max() - values.min()) < 1e-3:
        return MIN_SATURATION
    t = float(skimage(xp, "filters").threshold_otsu(values))
    return min(max(t, MIN_SATURATION), MAX_SATURATION)


# --- masks ----------------------------------------------------------------------------------------


def tissue_mask(rgb, mpp: float = DEFAULT_MASK_MPP, *, remove_pen: bool = True):
    """Tissue mask of an RGB(A) uint8 image: bool (h, w) in the input's namespace.

    ``mpp`` (µm per pixel of ``rgb``) scales the morphology; the default suits the 8 µm/px
    images made by ``slide_tissue_mask``. Background, near-white images, specks and (with
    ``remove_pen``) marker ink are rejected. A transparent alpha channel counts as background.
    """
    xp = array_namespace(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"tissue_mask expects an (h, w, 3|4) RGB(A) image, got shape {rgb.shape}")
    valid = rgb[..., 3] > 0 if rgb.shape[-1] == 4 else None
    rgb = rgb[..., :3]

    od = optical_density(rgb)
    raw_sat = saturation(rgb)
    sat = ndimage(xp).median_filter(raw_sat, size=3)  # as CLAM: denoise before Otsu
    t = _saturation_threshold(sat, valid)
    mask = (sat > t) & (channel_mean(od) > MIN_OD)
    glass, min_stain = _glass(rgb, od, raw_sat)
    mask |= stain_od(rgb, od, glass=glass) > min_stain  # pale or unsaturated stain, fat's lace
    if valid is not None:
        mask &= valid

    pen = None
    if remove_pen:
        pen = pen_mask(rgb, mpp, od, raw_sat, glass) & mask
        pen = _dilate(pen, PEN_MARGIN_UM / mpp)
        mask &= ~pen

    morphology = skimage(xp, "morphology")
    mask = _close(mask, CLOSING_UM / mpp)

    mask = _remove_small(morphology.remove_small_objects, mask, int(MIN_OBJECT_UM2 / mpp**2))
    mask = _remove_small(morphology.remove_small_holes, mask, int(MAX_HOLE_UM2 / mpp**2))
    if pen is not None:
        mask &= ~pen  # closing and hole filling must not bring ink back
    if valid is not None:
        mask &= valid
    return mask


MAX_SHIFTS = 50
"""Disks of up to this many pixels (radius < 4) are applied as shifted logical operations, which
cost a fraction of a distance transform; larger ones use the distance transform."""


def disk_offsets(radius: float) -> list[tuple[int, int]]:
    """(dy, dx) of the pixels of a disk of ``radius``: dy² + dx² <= radius²."""
    r = int(math.floor(radius))
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= radius * radius]


def _shifted_any(mask, offsets, outside: bool):
    """OR over the copies of ``mask`` shifted by each offset (AND of them when ``outside`` is
    True, where pixels shifted in from beyond the edge count as True)."""
    xp = array_namespace(mask)
    h, w = mask.shape
    out = xp.zeros_like(mask) if not outside else xp.ones_like(mask)
    combine = xp.logical_and if outside else xp.logical_or
    for dy, dx in offsets:
        target = out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        source = mask[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        combine(target, source, out=target)
    return out


def _dilate(mask, radius: float):
    """Binary dilation by a disk of ``radius`` px: pixels within ``radius`` of the mask."""
    if radius < 1 or not bool(mask.any()):
        return mask
    offsets = disk_offsets(radius)
    if len(offsets) <= MAX_SHIFTS:
        return _shifted_any(mask, offsets, outside=False)
    return ndimage(array_namespace(mask)).distance_transform_edt(~mask) <= radius


def _close(mask, radius: float):
    """Binary closing by a disk of ``radius`` px; outside the image counts as tissue for the
    erosion (as the distance transform measures only to zeros inside), so edges are kept."""
    if radius < 1 or not bool(mask.any()):
        return mask
    dilated = _dilate(mask, radius)
    offsets = disk_offsets(radius)
    if len(offsets) <= MAX_SHIFTS:
        return _shifted_any(dilated, offsets, outside=True)
    return ndimage(array_namespace(mask)).distance_transform_edt(dilated) > radius


# --- slides ---------------------------------------------------------------------------------------


def slide_tissue_mask(
    slide,
    mask_mpp: float = DEFAULT_MASK_MPP,
    *,
    require_tissue: bool = True,
    max_strip_pixels: int = 16 * 1024 * 1024,
):
    """Tissue mask of a whole slide at ``mask_mpp`` µm/px -> (mask numpy bool (h, w), mask_mpp).

    Reads the finest pyramid level not coarser than ``mask_mpp`` in horizontal strips of at most
    ``max_strip_pixels`` pixels (never a huge level whole), averages integer blocks of it,
    resamples to exactly ``mask_mpp`` (pixel (i, j) covers [j, j+1) x [i, i+1) * mask_mpp µm
    from the slide origin; area beyond the slide is white) and runs :func:`tissue_mask`.
    Raises SlideError when no tissue is found, unless ``require_tissue`` is False.
    """
    image = slide_image_at_mpp(slide, mask_mpp, max_strip_pixels=max_strip_pixels)
    grayscale = is_grayscale(image)
    mask = to_numpy(tissue_mask(image, mpp=mask_mpp))
    if grayscale:  # its dark texture passes the optical-density rule, but nothing here is stain
        mask[:] = False
    found, seen = float(mask.mean()), second_opinion(image)
    if require_tissue and not mask.any():
        why = ("the slide is grayscale, and tissue is found by its stain colour (H&E)" if grayscale
               else f"a plain optical-density threshold sees {seen:.0%} of it stained (marker ink? a stain "
                    "unlike H&E?)" if seen >= SECOND_OPINION_MIN
               else "the slide looks blank (background only or marker ink)")
        raise SlideError(slide.path, f"no tissue found at {mask_mpp:g} µm/px: {why}")
    if seen >= SECOND_OPINION_MIN and found < SECOND_OPINION_RATIO * seen:
        warnings.warn(f"{slide.path}: tissue detection kept {found:.1%} of the slide, a plain optical-density "
                      f"threshold sees {seen:.1%} stained: check the mask (pale stain taken for glass, stain "
                      "taken for ink?)", TissueWarning, stacklevel=2)
    return mask, float(mask_mpp)


def is_grayscale(image) -> bool:
    """Whether an RGB image has no colour at all (R = G = B everywhere) and is not just white or
    glass: a grayscale scan, which holds no H&E stain to find tissue by."""
    xp = array_namespace(image)
    grey = bool(xp.all(image[..., 0] == image[..., 1]) and xp.all(image[..., 1] == image[..., 2]))
    return grey and bool(image.min() < 200)


class TissueWarning(UserWarning):
    """A slide's tissue mask disagrees with the second opinion (:func:`second_opinion`)."""


def second_opinion(rgb) -> float:
    """Share of an RGB(A) image that a plain threshold calls stained: summed OD above the glass
    (:func:`stain_od`) above SECOND_OPINION_OD, no colour rules, no morphology. Cheap, and blind to
    what the mask's rules might get wrong (a stain taken for ink, pale stain taken for glass)."""
    rgb = rgb[..., :3]
    return float((stain_od(rgb) > SECOND_OPINION_OD).mean())


def slide_image_at_mpp(slide, target_mpp: float, *, max_strip_pixels: int = 16 * 1024 * 1024):
    """The whole slide as a uint8 RGB image at exactly ``target_mpp`` µm/px, on the slide's device
    (NumPy, or CuPy for a slide opened with ``device="cuda"``: the strips never leave the GPU).

    Output shape is ceil(level-0 size * mpp / target_mpp); the part of the last row/column of
    pixels beyond the slide is white.
    """
    base_mpp = slide.require_mpp()
    level = slide.level_for_mpp(target_mpp)
    downsample = float(slide.level_downsamples[level])
    level_mpp = base_mpp * downsample
    width0, height0 = slide.dimensions
    level_w = max(1, int(math.floor(width0 / downsample)))
    level_h = max(1, int(math.floor(height0 / downsample)))
    if hasattr(slide, "level_dimensions"):
        level_w, level_h = (int(v) for v in slide.level_dimensions[level])

    # Integer block averaging in strips, to an intermediate image no coarser than the target.
    k = max(1, int(math.floor(target_mpp / level_mpp + 1e-6)))
    out_h = max(1, math.ceil(height0 * base_mpp / target_mpp - 1e-6))
    out_w = max(1, math.ceil(width0 * base_mpp / target_mpp - 1e-6))
    exact = k == 1 and abs(level_mpp / target_mpp - 1.0) < 1e-6 and (level_h, level_w) == (out_h, out_w)
    rows = max(k, (max_strip_pixels // max(level_w, 1)) // k * k)
    strips = []
    for y in range(0, level_h, rows):
        h = min(rows, level_h - y)
        region = slide.read_region((0, int(round(y * downsample))), (level_w, h), level=level)
        strips.append(region[..., :3] if exact else _block_mean(region[..., :3], k))
    small = array_namespace(strips[0]).concatenate(strips, axis=0)
    if exact:  # a pyramid level at exactly the target: its pixels as they are
        return small
    return _resample(small, level_mpp * k, target_mpp, (out_h, out_w))


def _block_mean(rgb, k: int):
    """Mean over k x k blocks (float32); ragged edge blocks are padded with white."""
    xp = array_namespace(rgb)
    if k == 1:
        return rgb.astype(xp.float32)
    h, w, c = rgb.shape
    ph, pw = (-h) % k, (-w) % k
    x = rgb.astype(xp.float32)
    if ph or pw:
        x = xp.pad(x, ((0, ph), (0, pw), (0, 0)), constant_values=255.0)
    return x.reshape((h + ph) // k, k, (w + pw) // k, k, c).mean(axis=(1, 3))


def _resample(image, src_mpp: float, dst_mpp: float, shape):
    """Resample a float RGB image from ``src_mpp`` to ``dst_mpp`` µm/px, origin-anchored.

    Output pixel i has its centre at (i + 0.5) * dst_mpp µm, i.e. source coordinate
    (i + 0.5) * s - 0.5 with s = dst_mpp / src_mpp; a Gaussian prefilter (sigma (s - 1) / 2,
    as skimage.transform.resize uses) stands in for area averaging. Outside is white.
    """
    xp = array_namespace(image)
    ndi = ndimage(xp)
    s = dst_mpp / src_mpp
    image = image.astype(xp.float32)
    if abs(s - 1.0) < 1e-6 and image.shape[:2] == tuple(shape):
        return xp.clip(xp.rint(image), 0, 255).astype(xp.uint8)
    if s > 1:
        image = ndi.gaussian_filter(image, sigma=((s - 1) / 2, (s - 1) / 2, 0), mode="nearest")
    out = xp.stack([
        ndi.affine_transform(image[..., c], matrix=xp.asarray([s, s]), offset=[0.5 * s - 0.5, 0.5 * s - 0.5],
                             output_shape=tuple(shape), order=1, mode="constant", cval=255.0)
        for c in range(3)
    ], axis=-1)
    return xp.clip(xp.rint(out), 0, 255).astype(xp.uint8)
