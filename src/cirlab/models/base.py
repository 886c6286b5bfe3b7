"""The model contract every cirlab method honours (see ARCHITECTURE.md).

    state  = model.encode_queries(reference_images, texts)
    feats  = model.encode_targets(images)
    scores = model.score(state, feats)          # B x N, exact
    model.query_vectors(state) . model.index_vectors(feats)   # = scores, or a shortlist's approximation

Images are pixel batches (B x 3 x H x W) or, with a frozen backbone, the backbone's cached
feature maps; the image encoder tells them apart (see `ImageEncoder.feature_map`).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.images import Preprocessing, Size


class ScaledNormalization(nn.Module):
    """TIRG's NormalizationLayer: f -> s * f / ||f||, one learnable scale shared by both sides.

    Used only inside the training loss; retrieval ranks by cosine, which the scale does not change.
    """

    def __init__(self, initial_scale: float = 4.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(initial_scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1)


class CIRModel(nn.Module, metaclass=ABCMeta):
    """Base class: a query side, a target side and an exact score between them."""

    # How every image reaches the model (`cirlab.images.Preprocessing`: size, crop or pad, pre-crop size, training
    # augmentation), from the run's data config with a null data.image_size resolved to the training images'
    # native size. Set by training and recorded in the checkpoint, so evaluation, indexing, search,
    # explanations and the server preprocess any photo as training's evaluation view did. The default
    # (no size) lets images pass as they are.
    preprocessing: Preprocessing = Preprocessing()

    @property
    def image_size(self) -> Size | None:
        """The (height, width) the model sees: `preprocessing.size`. Setting it keeps the rest of the spec."""
        return self.preprocessing.size

    @image_size.setter
    def image_size(self, size: int | Size | None) -> None:
        self.preprocessing = self.preprocessing.with_size(size)

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.normalization = ScaledNormalization()

    @abstractmethod
    def encode_queries(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """One query state per (reference image, text) pair."""

    def encode_targets(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    # Whether the query side sees its reference image only through the reference's `encode_targets` feature, so
    # that `queries_from_image_features` gives the query states from it: an image embedded once then serves as
    # reference and as target (training embeds each distinct image of a step once, evaluation reuses the
    # gallery's features for references in the gallery).
    composes_image_features = False

    def queries_from_image_features(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The query states of references whose `encode_targets` features are `image_features`
        (for models with `composes_image_features`)."""
        raise NotImplementedError(f"{type(self).__name__} reads its reference images itself: encode them")

    # Whether `score` is exactly <query_vectors, index_vectors>: a vector index then ranks by it, exactly or
    # approximately as its factory does. Otherwise the vectors give a two-stage search its shortlist, and
    # `score` ranks the shortlist over the full target features the index keeps (`cirlab.index.search`).
    vectors_score_exactly = True

    def index_vectors(self, targets: torch.Tensor) -> torch.Tensor:
        """What an index stores for each target (N x d): by default the unit target vector."""
        if targets.dim() != 2:
            raise ValueError(f"encode_targets returned shape {tuple(targets.shape)}; a vector index needs one "
                             "vector per image, or a model that defines `index_vectors`")
        return F.normalize(targets, dim=-1)

    def query_vectors(self, queries: torch.Tensor) -> torch.Tensor:
        """What an index is searched with for each query state (B x d), by inner product."""
        return F.normalize(queries, dim=-1)

    def score(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Every query against every target (B x N): by default the cosine of the two vectors."""
        return self.query_vectors(queries) @ self.index_vectors(targets).T

    def loss_features(self, queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the training loss sees of a step's query states and target features (float32).

        Default: both scaled-normalised, as the vector losses (soft triplet, batch classification) expect.
        Methods whose query state is not one vector return their states unchanged and score them in
        `training_loss`.
        """
        return self.normalization(queries), self.normalization(candidates)

    def training_loss(self, queries: torch.Tensor, candidates: torch.Tensor,
                      retrieval_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The step's loss over the (gathered) batch; `retrieval_loss` is the configured `train.loss`.

        Methods with their own objective (extra terms, per-pair scores) override this.
        """
        return retrieval_loss(queries, candidates)

    def double_backward_blocker(self) -> str | None:
        """Why this model cannot be trained through a gradient of a gradient (MMGrad's attention loss),
        or None when it can."""
        return None


class VectorCompositionModel(CIRModel):
    """A model whose query is `compose(image vector, text vector)`."""

    def encode_queries(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.compose(self.image_encoder(images), self.text_encoder(texts))

    composes_image_features = True

    def queries_from_image_features(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.compose(image_features, self.text_encoder(texts))

    @abstractmethod
    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Fuse B x D image and text features into B x D query features."""
