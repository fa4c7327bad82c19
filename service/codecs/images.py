"""Image files -> model inputs: the one place it is done, for ``POST /predict/image`` and the
page at ``/`` (which sends the image file as it is, uploaded or drawn, to that endpoint).

Which preparation an image gets is the checkpoint's input convention's
(:meth:`service.codecs.inputs.InputSchema.image_to_raw`):

* MNIST models (28x28 grayscale, white strokes on black): :func:`mnist_input` lays any
  picture of a digit out as MNIST laid out its digits, so that a photo of ink on paper, a
  drawing or an MNIST image itself all give the model what it was trained on: transparency is
  flattened onto the background that contrasts with the strokes, a light background is
  inverted (the model reads light strokes on dark), the strokes are cropped to their bounding
  box, scaled (area average) so that its longer side is 20 of the 28 pixels, and placed with
  their centre of mass at the image's centre (LeCun et al.'s preprocessing of NIST).
* Any other image model: the convention's own conversion
  (:meth:`apd.checkpoint.InputConvention.image_to_raw`: its mode, resized to its shape).
"""

from __future__ import annotations

import io
from typing import Final

import numpy as np
from numpy.typing import NDArray

SIDE: Final = 28
BOX_FRACTION: Final = 20 / 28  # MNIST: the digit's box fits 20x20 of the 28x28 image
INK_THRESHOLD: Final = 0.1  # of the strongest stroke: what counts as ink when cropping
MIN_CONTRAST: Final = 0.05  # below this between ink and background the image is blank
MAX_SIDE: Final = 1024  # larger images are scaled down before anything else
BORDER_FRACTION: Final = 0.04  # the outer ring whose mean is the background's brightness
LUMA: Final = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601, as Pillow's L


def _grey_on_background(data: bytes) -> NDArray[np.float64]:
    """An image file -> grey levels in [0, 1] (H, W), at most :data:`MAX_SIDE` on a side;
    transparent pixels take the background that contrasts with the opaque ones (dark strokes
    go on white, light ones on black). ``ValueError`` for what is not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            im = ImageOps.exif_transpose(opened).convert("RGBA")
        scale = min(1.0, MAX_SIDE / max(im.size))
        if scale < 1.0:
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.BOX)
        rgba = np.asarray(im, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    grey = rgba[..., :3] @ LUMA
    alpha = rgba[..., 3]
    if (alpha < 1.0).any():
        opaque = alpha > 0.5
        dark_strokes = opaque.any() and float(grey[opaque].mean()) < 0.5
        background = 1.0 if dark_strokes else 0.0
        grey = alpha * grey + (1.0 - alpha) * background
    return grey


def border_mean(plane: NDArray[np.float64]) -> float:
    """Mean of a plane over its outer ring (4% of the shorter side, at least one pixel)."""
    h, w = plane.shape
    ring = max(1, round(BORDER_FRACTION * min(h, w)))
    inner = plane[ring : h - ring, ring : w - ring]
    total = plane.sum() - inner.sum()
    count = plane.size - inner.size
    return float(total / count) if count else 0.0


def _area_weights(n: int, m: int) -> NDArray[np.float64]:
    """``(m, n)``: output ``i`` is the area-weighted mean of inputs ``[i n / m, (i + 1) n / m)``."""
    edges = np.arange(m + 1) * (n / m)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resample(window: NDArray[np.float64], th: int, tw: int) -> NDArray[np.float64]:
    """``window`` (h, w) averaged by area into ``(th, tw)``."""
    h, w = window.shape
    return _area_weights(h, th) @ window @ _area_weights(w, tw).T


def crop_and_centre(plane: NDArray[np.float64], side: int = SIDE) -> NDArray[np.float64]:
    """MNIST's layout of a plane of light strokes on dark: background to 0, strongest ink to 1,
    the ink's bounding box scaled into the central 20x20 box (of 28), placed by its centre of
    mass at the centre. A blank plane gives zeros."""
    out = np.zeros((side, side))
    background = border_mean(plane)
    peak = float(plane.max())
    if peak - background < MIN_CONTRAST:
        return out
    level = np.clip((plane - background) / (peak - background), 0.0, 1.0)
    rows, cols = np.nonzero(level > INK_THRESHOLD)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    ch, cw = y1 - y0, x1 - x0
    scale = BOX_FRACTION * side / max(ch, cw)
    bh = int(min(side, max(1, round(ch * scale))))
    bw = int(min(side, max(1, round(cw * scale))))
    patch = resample(level[y0:y1, x0:x1], bh, bw)
    mass = patch.sum()
    ys, xs = np.indices(patch.shape)
    cy = float((patch * ys).sum() / mass) if mass > 0 else (bh - 1) / 2
    cx = float((patch * xs).sum() / mass) if mass > 0 else (bw - 1) / 2
    # MNIST's centres of mass lie at (14, 14) in pixel indices on average: (side / 2, side / 2).
    oy = int(np.clip(round(side / 2 - cy), 0, side - bh))
    ox = int(np.clip(round(side / 2 - cx), 0, side - bw))
    out[oy : oy + bh, ox : ox + bw] = patch
    return out


def mnist_input(data: bytes) -> NDArray[np.float32]:
    """An image file of a digit -> 784 floats in [0, 1], white on black, laid out as MNIST's
    (the module docstring). ``ValueError`` for what is not a readable image."""
    grey = _grey_on_background(data)
    if border_mean(grey) > 0.5:  # a light background: the model reads light strokes on dark
        grey = 1.0 - grey
    return crop_and_centre(grey).astype(np.float32).reshape(SIDE * SIDE)
