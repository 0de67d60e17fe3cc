"""`shapes`: a small natural-image dataset rendered on the spot, written as an image folder.

Each 32x32 RGB image is one of 8 shapes (the class) in a random colour with a shading
gradient, at a random size and position, on a background cut from scikit-learn's two sample
photos (china.jpg and flower.jpg, shipped inside its wheel) at a random place, scale and
mirror. Every class is symmetric under a horizontal flip, so a flipped image keeps its label;
objects are off-centre and of varied size, so random resized crops matter. Nothing is
downloaded. Drawn at 64x64 and averaged down 2x2 (smooth edges), from `numpy`'s generator
seeded by `seed`.

`write_folder(root)` writes the preset-split layout `kd prepare` reads:

    root/train/<class>/<n>.png      TRAIN images per class
    root/test/<class>/<n>.png       TEST images per class
    root/unlabeled/<n>.png          UNLABELED images, no class folders

`kd prepare --dataset shapes` renders it into a temporary folder and prepares that folder
(the same bytes as `prepare.dataset: <root>` after `python -m kd.sources.shapes <root>`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASSES = ("cross", "diamond", "disk", "hourglass", "ring", "square", "triangle", "x")
TRAIN, TEST, UNLABELED = 150, 125, 3000  # per class, per class, in all
SIZE = 32
_DRAW = 2 * SIZE  # drawn at twice the size, then averaged down


def _photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos at 1/2 and 1/4 of their size: (h, w, 3) float32 in [0, 1]."""
    from sklearn.datasets import load_sample_images

    photos = []
    for image in load_sample_images().images:  # (427, 640, 3) uint8 each
        image = image.astype(np.float32) / 255
        for factor in (2, 4):
            h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
            photos.append(image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean((1, 3)))
    return photos


def _mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    # u, v: (D, D) pixel offsets from the shape's centre (v down); True inside the shape
    au, av = np.abs(u), np.abs(v)
    arm = 0.35 * radius
    if shape == "disk":
        return u**2 + v**2 <= radius**2
    if shape == "ring":
        return (u**2 + v**2 <= radius**2) & (u**2 + v**2 >= (0.55 * radius) ** 2)
    if shape == "square":
        return (au <= 0.85 * radius) & (av <= 0.85 * radius)
    if shape == "diamond":
        return au + av <= radius
    if shape == "cross":
        return ((au <= arm) & (av <= radius)) | ((av <= arm) & (au <= radius))
    if shape == "x":
        return (np.abs(u - v) <= 1.4 * arm) & (np.abs(u + v) <= 2 * radius) | \
            (np.abs(u + v) <= 1.4 * arm) & (np.abs(u - v) <= 2 * radius)
    if shape == "triangle":  # apex up: flip-symmetric
        return (v <= 0.8 * radius) & (v >= -radius + 2 * au)
    if shape == "hourglass":
        return (av <= radius) & (au <= av * 0.9 + 0.1 * radius)
    raise ValueError(shape)


def render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, SIZE, SIZE, 3) uint8 images of the classes `labels` (indices into CLASSES)."""
    photos = _photos()
    grid = np.arange(_DRAW, dtype=np.float32) + 0.5
    images = np.empty((len(labels), SIZE, SIZE, 3), np.uint8)
    for n, label in enumerate(labels):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - _DRAW), rng.integers(photo.shape[1] - _DRAW)
        canvas = photo[top:top + _DRAW, left:left + _DRAW].copy()
        if rng.random() < 0.5:
            canvas = canvas[:, ::-1]
        radius = rng.uniform(0.22, 0.42) * _DRAW
        cy, cx = rng.uniform(0.5 * radius, _DRAW - 0.5 * radius, size=2)
        mask = _mask(CLASSES[label], grid[None, :] - cx, grid[:, None] - cy, radius)
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)  # shading: brighter on one side
        shade = 0.7 + 0.3 * ((np.cos(angle) * (grid[None, :] - cx) + np.sin(angle) * (grid[:, None] - cy))
                             / radius).clip(-1, 1)
        canvas[mask] = (colour[None, None, :] * shade[..., None])[mask]
        small = canvas.reshape(SIZE, 2, SIZE, 2, 3).mean((1, 3))
        images[n] = np.round(small * 255).clip(0, 255).astype(np.uint8)
    return images


def write_folder(root: Path, seed: int = 0) -> Path:
    """Render the dataset into `root` (train/<class>/, test/<class>/, unlabeled/) as PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = {"train": TRAIN * len(CLASSES), "test": TEST * len(CLASSES), "unlabeled": UNLABELED}
    for split, count in counts.items():
        labels = np.arange(count) % len(CLASSES)
        for n, (label, image) in enumerate(zip(labels, render(labels, rng))):
            folder = root / split if split == "unlabeled" else root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{n:05d}.png")
    return root


if __name__ == "__main__":  # python -m kd.sources.shapes ROOT: write the folder to look at
    print(write_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "datasets/shapes")))
