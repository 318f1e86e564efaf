"""LISA, Layerwise Importance Sampled AdamW (Pan et al., 2024): full fine-tuning of a few decoder layers at a time.

Every `lisa_step_interval` optimizer steps, `lisa_n_layers` of the decoder layers are drawn at random to train
and every other decoder layer is frozen (`requires_grad = False`); embeddings, the output head and the final
norm always train, as in the paper. The optimizer is built over every parameter beforehand; a frozen one gets
no gradient (gradients are set to None after every step), and torch's and the other optimizers skip a
parameter without one: no update and no weight decay, its moments kept until it is drawn again.

The draw is a function of (seed, interval number) only, so a run resumed mid-interval trains the same layers
without any saved state.
"""

from __future__ import annotations

import logging
from functools import reduce

import numpy as np
import torch

from tuneforge.errors import TuneforgeError

log = logging.getLogger("tuneforge")


def decoder_layers(model, attribute: str) -> torch.nn.ModuleList:
    """The list of decoder layers at `attribute` (dotted, from the model); a clear error when it is not one."""
    try:
        layers = reduce(getattr, attribute.split("."), model)
    except AttributeError:
        layers = None
    if not isinstance(layers, torch.nn.ModuleList):
        found = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n]
        raise TuneforgeError(f"lisa_layers_attribute: `{attribute}` is not a list of layers of this model "
                             f"({type(model).__name__}); its layer lists are: {', '.join(found[:5]) or 'none'}")
    return layers


def chosen_layers(seed: int, interval: int, total: int, n: int) -> list[int]:
    """The layers trained during `interval` (0, 1, ...): n of range(total), drawn without replacement."""
    rng = np.random.default_rng([seed, interval])
    return sorted(int(i) for i in rng.choice(total, size=n, replace=False))


class LayerSampler:
    """Freezes all decoder layers but the drawn ones, before each optimizer step that starts an interval."""

    def __init__(self, model, *, n_layers: int, every: int, attribute: str, seed: int):
        self.layers = decoder_layers(model, attribute)
        if n_layers > len(self.layers):
            raise TuneforgeError(f"lisa_n_layers: {n_layers} is more than the model's {len(self.layers)} decoder "
                                 f"layers; lower it")
        self.n, self.every, self.seed = n_layers, every, seed
        self.interval: int | None = None  # the interval whose layers are trainable now
        self.active: list[int] = []
        log.info("LISA: %d of %d decoder layers train at a time, drawn every %d steps", n_layers, len(self.layers),
                 every)

    def before_step(self, step: int) -> None:
        """`step`: optimizer steps done so far (a resumed run starts mid-interval with the same draw)."""
        interval = step // self.every
        if interval == self.interval:
            return
        self.interval = interval
        self.active = chosen_layers(self.seed, interval, len(self.layers), self.n)
        for i, layer in enumerate(self.layers):
            layer.requires_grad_(i in self.active)
        log.debug("LISA: layers %s train from step %d", self.active, step + 1)
