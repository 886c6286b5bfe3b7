"""Heat-map explanations as pictures: where the model looked, drawn over the image."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

from cirlab.explain.gradcam import method_scalar, mmgrad, upsample_map
from cirlab.images import fit_image, image_tensor
from cirlab.models.base import CIRModel


def explain_pair(model: CIRModel, reference: Image.Image, text: str, target: Image.Image,
                 method: str = "mmgrad", side: str = "reference") -> np.ndarray:
    """Saliency in [0, 1] at the explained image's size (H x W), in eval mode.

    `gradcam` explains the retrieval score itself; `mmgrad` the default text-conditioned scalar.
    The map covers the image as the model sees it outside training (`fit_image`: resized, cropped or padded).
    """
    scalar = method_scalar(method)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    reference, target = fit_image(reference, model.preprocessing), fit_image(target, model.preprocessing)
    try:
        cam = mmgrad(model, image_tensor(reference)[None].to(device), [text], image_tensor(target)[None].to(device),
                     scalar=scalar, side=side)
    finally:
        model.train(was_training)
    explained = reference if side == "reference" else target
    size = (explained.height, explained.width)
    return upsample_map(cam.detach(), size)[0].cpu().numpy()


def heatmap_overlay(image: Image.Image, saliency: np.ndarray, alpha: float = 0.5, scale: int = 1) -> Image.Image:
    """The image with the saliency (H x W in [0, 1], jet colours) blended over it, enlarged `scale` times
    with nearest-neighbour so small images keep their pixels."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    if saliency.shape != rgb.shape[:2]:
        raise ValueError(f"saliency {saliency.shape} does not match the image {rgb.shape[:2]}")
    colours = colormaps["jet"](np.clip(saliency, 0, 1))[..., :3]
    blended = (1 - alpha) * rgb + alpha * colours
    picture = Image.fromarray(np.round(blended * 255).astype(np.uint8))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture
