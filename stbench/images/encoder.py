"""The encoder contract: a frozen patch → feature-vector function that owns its transforms.

An encoder plugin registers an :class:`~stbench.specs.EncoderSpec` whose ``factory(weights)`` returns an
:class:`Encoder`. ``weights`` is what the user gave with ``--encoder-weights`` (a local file path, the
word ``"random"``, or ``None`` for the encoder's default source). The harness then:

* cuts patches at the size in µm the benchmark asks for and resizes them to ``input_size`` pixels;
* calls :meth:`Encoder.encode` on uint8 RGB batches of shape (B, input_size, input_size, 3);
* caches the (B, dim) float32 features on disk, keyed by ``name`` and ``weights_id`` (among others),
  so a different checkpoint never reuses stale features.

Everything about the encoder's input (normalisation, channel order, precision, device) is its own
business inside ``encode``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class Encoder:
    #: registry name
    name: str = ""
    #: side of the square RGB input in pixels; patches are resized to this
    input_size: int = 224
    #: width of the output feature vector
    dim: int = 0
    #: identifies the weights: a content hash of the checkpoint, "random-init", or "none" (no weights)
    weights_id: str = "none"
    #: patches per call to the model; implementations may lower it when memory runs out
    batch_size: int = 256

    def encode(self, patches: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB → (B, dim) float32 features."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What to record with results (name, weights, sizes, precision)."""
        return {"name": self.name, "weights_id": self.weights_id, "input_size": self.input_size, "dim": self.dim}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content (first 16 hex digits): the cache key of a checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()[:16]
