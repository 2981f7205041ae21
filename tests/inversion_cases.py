"""The layers, collages and small helpers the textual-inversion tests share (test_inversion*.py)."""

from __future__ import annotations

import numpy as np
import torch

from core.collage import Collage, Layer
from core.inversion import (
    InversionSettings,
)

TINY = InversionSettings(steps=2, resolution=64, seed=5)


def sushi_image(size=(24, 20)) -> np.ndarray:
    """An object (alpha 255) with a detail, inside a transparent border of junk colour."""
    h, w = size
    img = np.zeros((h, w, 4), np.uint8)
    img[..., :3] = (90, 140, 250)  # colour of the invisible border
    img[4 : h - 4, 3 : w - 3] = (230, 110, 60, 255)
    img[8:12, 6:10, :3] = (250, 250, 240)
    img[4 : h - 4, 3, 3] = 128  # a soft edge
    return img


def sushi_collage(appearance=True, **overrides) -> Collage:
    leaf = np.zeros((20, 28, 4), np.uint8)
    leaf[...] = (30, 200, 60, 255)
    kwargs = dict(
        prompt="salmon sushi on a green leaf",
        layers=[
            Layer("green leaf", leaf, offset=(30, 30)),
            Layer("salmon sushi", sushi_image(), offset=(6, 8), appearance=appearance),
        ],
        width=64,
        height=64,
        steps=4,
        strength=0.8,
        seed=3,
    )
    kwargs.update(overrides)
    return Collage(**kwargs)


def model_state(model):
    te = model.pipeline.text_encoder
    return len(model.pipeline.tokenizer), te.get_input_embeddings(), te.get_input_embeddings().weight.shape


def learning_events(events, text="salmon sushi"):
    return [(e.step, e.total) for e in events if e.phase == f"learning appearance of '{text}'"]


def encode(model, prompt: str) -> torch.Tensor:
    cond, _ = model.pipeline.encode_prompt(prompt, model.device, 1, False)
    return cond
