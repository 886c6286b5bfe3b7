"""The offline default dominant-portion segmentation: border-connected background removal by colour.

Product photos put one dominant object near the middle of a background that reaches the image
border. So the background's colours are read off a thin ring along the border; a pixel is
foreground when its (smoothed) CIELAB colour is far from every ring colour, the cut being Otsu's
threshold of those distances. Morphological closing, hole filling and opening tidy the foreground,
and of its 8-connected components the one with the largest area x a Gaussian centre prior is the
dominant portion. The soft mask is that component smoothed by a one-pixel Gaussian.

Chosen by measurement on the synthetic garments with clutter (binary IoU at 0.5 against the generator's
garment masks, `cirlab data masks DATA --source saliency`): mean 0.753 / 0.773 over the demo preset's
1500 photos at 64 / 128 px, 0.775 over 900 photos at 256 px (medians 0.82-0.84). On a 300-photo
subsample at 128 px, where this method scored 0.80, a background model over EfficientNet-Lite0 features
(distance of stage-2/3 features to the border's, alone or added to the colour distance) scored
0.55-0.79: the clutter props are objects to ImageNet features too; fixed colour thresholds instead of
Otsu's scored 0.73-0.78. What it misses: props and occluders touching the garment join it, and garments
coloured like their background.

Images are processed with their shorter side at `WORK_SIZE` pixels (the measured setting) and the
mask is resized back, so the result and the cost do not depend on the files' resolution.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SALIENCY_VERSION = 1   # recorded in the mask cache's manifest: bump it when the output changes
WORK_SIZE = 128        # shorter side the segmentation runs at
_SIGMA = 1.5           # colour smoothing (pixels at WORK_SIZE): merges fine garment patterns
_RING = 2              # border ring width that samples the background colours
_CLOSE, _OPEN = 2, 1   # morphology iterations
_CENTRE_PRIOR = 2.0    # component score = area * exp(-prior * (distance of its centroid / half side)^2)


def _working_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image with its shorter side at WORK_SIZE (never enlarged), as floats in [0, 1], and its scale
    relative to a WORK_SIZE image (1 unless the image is smaller)."""
    height, width = image.shape[:2]
    shorter = min(height, width)
    if shorter > WORK_SIZE:
        factor = WORK_SIZE / shorter
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return image.astype(np.float64) / 255.0, min(shorter, WORK_SIZE) / WORK_SIZE


def _background_distance(lab: np.ndarray, ring: int) -> np.ndarray:
    """Distance of every pixel's colour to the nearest colour on the border ring (CIELAB units)."""
    from scipy.spatial import cKDTree

    border = np.concatenate([lab[:ring].reshape(-1, 3), lab[-ring:].reshape(-1, 3),
                             lab[:, :ring].reshape(-1, 3), lab[:, -ring:].reshape(-1, 3)])
    colours = np.unique(np.round(border), axis=0)  # backgrounds have few colours: a much smaller tree
    distance, _ = cKDTree(colours).query(lab.reshape(-1, 3), k=1)
    return distance.reshape(lab.shape[:2])


def _dominant_component(foreground: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    if count == 0:
        return foreground
    ids = np.arange(1, count + 1)
    ones = np.ones_like(labels)
    area = np.asarray(ndimage.sum(ones, labels, ids))
    centres = np.asarray(ndimage.center_of_mass(ones, labels, ids)).reshape(count, 2)
    height, width = foreground.shape
    offset = np.hypot(centres[:, 0] - height / 2, centres[:, 1] - width / 2) / (min(height, width) / 2)
    return labels == ids[np.argmax(area * np.exp(-_CENTRE_PRIOR * offset ** 2))]


def saliency_mask(image: np.ndarray) -> np.ndarray:
    """The soft dominant-portion mask (H x W uint8, 255 = dominant) of one H x W x 3 uint8 RGB image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} of shape {image.shape}")
    from scipy import ndimage
    from skimage.color import rgb2lab
    from skimage.filters import threshold_otsu

    height, width = image.shape[:2]
    floats, scale = _working_copy(image)
    sigma = _SIGMA * scale
    lab = ndimage.gaussian_filter(rgb2lab(floats), sigma=(sigma, sigma, 0))
    distance = _background_distance(lab, max(1, round(_RING * scale)))
    if np.ptp(distance) < 1e-6:  # one flat colour: nothing stands out
        return np.zeros((height, width), dtype=np.uint8)
    foreground = distance > threshold_otsu(distance)
    foreground = ndimage.binary_closing(foreground, iterations=max(1, round(_CLOSE * scale)), border_value=0)
    foreground = ndimage.binary_fill_holes(foreground)
    foreground = ndimage.binary_opening(foreground, iterations=max(1, round(_OPEN * scale)))
    soft = ndimage.gaussian_filter(_dominant_component(foreground).astype(np.float64), sigma=scale)
    mask = Image.fromarray(np.round(soft * 255).astype(np.uint8))
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(mask)
