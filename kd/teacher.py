"""Training the teacher on the labeled split (hard labels, random-shift or crop-and-flip augmentation).

The same loop as every student (`training.fit`); augmentation is the view recipe of
`augment`, drawn fresh each epoch. Writes nothing itself: the stage saves the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kd.prepared import images
from kd.config import TeacherConfig, as_dict, view_recipe
from kd.augment import check_shape
from kd.models import build
from kd.loader import baseline_set
from kd.training import fit, hard_label_loss, predict


def train_teacher(cfg: TeacherConfig, prepared: Path, *, progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Return (model, config to save beside the weights, metrics)."""
    # the labeled split with its labels, as a baseline twin sees it, plus the augmentation
    recipe = view_recipe(cfg, cfg.shift)
    dataset = baseline_set(prepared, view_seed=cfg.seed, recipe=recipe)
    augmented = cfg.shift > 0 or cfg.view_recipe != "shift"
    test = images.read_split(prepared / "test.parquet")
    check_shape(recipe, test.input_shape, "teacher")
    torch.manual_seed(cfg.seed)
    model = build(cfg.arch, cfg.arch_kwargs, test.input_shape, test.num_classes)
    log = fit(model, dataset, {"hard": (1.0, hard_label_loss)}, epochs=cfg.epochs, batch_size=cfg.batch_size,
              lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, views="fresh" if augmented else "none",
              desc="teacher", progress=progress)
    logits = predict(model, torch.tensor(test.x), test.input_shape)
    accuracy = float((logits.argmax(1).numpy() == test.y).mean())
    config = {"arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs, "input_shape": test.input_shape,
              "num_classes": test.num_classes, "training": as_dict(cfg)}
    metrics = {"test_accuracy": accuracy, "train_loss": log[-1]["total"], "epochs": len(log)}
    return model, config, metrics
