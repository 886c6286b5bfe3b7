"""How a checkpoint came to be, in words, for every metrics file and result table: which checkpoint of the run
it is (see cirlab.selection) and how its image tower was initialised. Results on differently selected or
initialised models are not comparable, so every result says both."""

from __future__ import annotations

from cirlab.config import Config
from cirlab.encoders.image import image_initialisation

# The benchmarks whose release has a validation split of its own, and what `protocol.split` calls it.
OWN_VALIDATION_SPLIT: dict[str, str] = {"fashioniq": "val", "cirr": "val"}


def describe_selection(config: Config) -> str:
    """The run's `train.selection` in words, from its config alone."""
    train = config.train
    if train.selection == "carve":
        return (f"best {train.select_metric or 'R@1'} on a validation split carved from train "
                f"({config.data.val_fraction:.0%} of the source images)")
    if train.selection == "val":
        split = OWN_VALIDATION_SPLIT.get(config.data.format, "val")
        return f"best {train.select_metric or 'avg'} on the benchmark's own {split} split"
    return "the last one (trained on the whole train split, no validation)"


def describe_start(config: Config) -> dict[str, str]:
    """Which checkpoint of its run a model is and where its image tower started, as a result states them."""
    return {"checkpoint": describe_selection(config),
            "image tower": image_initialisation(config.model.image_backbone, config.model.image_weights)}
