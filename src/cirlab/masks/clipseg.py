"""CLIPSeg masks (as OFFSET made its masks): `transformers`' CLIPSegForImageSegmentation from a local
folder, prompted per image with a caption.

The folder is what `save_pretrained` writes for the model and its `CLIPSegProcessor` (config.json,
model.safetensors, the tokenizer and image-processor files), e.g. a downloaded copy of
CIDAS/clipseg-rd64-refined; it is never fetched from a hub. OFFSET prompted CLIPSeg with a BLIP-2
caption of each image; cirlab has no captioner, so a caption comes from a JSON file mapping image
file stems to captions (made by any captioner), and images without one get a fixed prompt.

CLIPSeg squashes every image to its square input; the sigmoid of its logits is resized back to the
image's own size (bilinear), so the mask is pixel-aligned with the image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.images import load_image
from cirlab.masks.base import MaskSource

DEFAULT_PROMPT = "the main object"
BATCH_SIZE = 8


def read_captions(path: Path) -> dict[str, str]:
    """A JSON object of image file stem -> caption."""
    try:
        captions = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the captions file {path}: {error}") from error
    if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                 for k, v in captions.items()):
        raise ValueError(f"captions file {path} must be a JSON object of image file stem -> non-empty caption")
    return captions


class CLIPSegMasks(MaskSource):
    """CLIPSeg from `weights`; without weights it can only read masks cached earlier."""

    name = "clipseg"

    def __init__(self, weights: str | Path | None, prompt: str = DEFAULT_PROMPT, captions: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = BATCH_SIZE) -> None:
        if not prompt.strip():
            raise ValueError("the CLIPSeg prompt is empty")
        self.weights = None if weights is None else Path(weights).absolute()
        if self.weights is not None and not (self.weights / "config.json").is_file():
            raise ValueError(f"CLIPSeg weights folder {weights} has no config.json (expected the output of "
                             "save_pretrained for CLIPSegForImageSegmentation and its CLIPSegProcessor)")
        self.prompt = prompt
        self.captions_file = None if captions is None else Path(captions).absolute()
        self.captions = {} if captions is None else read_captions(Path(captions))
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._loaded: tuple[Any, Any] | None = None

    def settings(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else str(self.weights), "prompt": self.prompt,
                "captions": None if self.captions_file is None else str(self.captions_file)}

    def accepts(self, settings: dict[str, Any]) -> bool:
        return self.weights is None or settings == self.settings()  # a model reads whatever the user built

    def missing_hint(self) -> str:
        return "run `cirlab data masks DATA --source clipseg --weights FOLDER`"

    @property
    def can_compute(self) -> bool:
        return self.weights is not None

    def _model(self) -> tuple[Any, Any]:
        if self._loaded is None:
            if self.weights is None:
                raise ValueError(f"CLIPSeg masks need a weights folder: {self.missing_hint()}")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub
            try:
                from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
            except ImportError as error:
                raise ValueError("CLIPSeg masks need the transformers package: pip install 'cirlab[clipseg]'") \
                    from error

            processor = CLIPSegProcessor.from_pretrained(str(self.weights), local_files_only=True)
            model = CLIPSegForImageSegmentation.from_pretrained(str(self.weights), local_files_only=True)
            self._loaded = processor, model.eval().to(self.device)
        return self._loaded

    def prompt_for(self, image: Path) -> str:
        return self.captions.get(Path(image).stem, self.prompt)

    @torch.no_grad()
    def compute(self, root: Path, images: Sequence[Path]) -> Iterator[np.ndarray]:
        processor, model = self._model()
        for start in range(0, len(images), self.batch_size):
            paths = images[start:start + self.batch_size]
            pictures = [load_image(path).convert("RGB") for path in paths]
            inputs = processor(text=[self.prompt_for(path) for path in paths], images=pictures, return_tensors="pt",
                               padding=True)
            logits = model(**{key: value.to(self.device) for key, value in inputs.items()}).logits
            probabilities = torch.sigmoid(logits.float()).reshape(len(paths), 1, *logits.shape[-2:])
            for picture, probability in zip(pictures, probabilities):
                resized = F.interpolate(probability[None], size=(picture.height, picture.width), mode="bilinear",
                                        align_corners=False)[0, 0]
                yield (resized * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
