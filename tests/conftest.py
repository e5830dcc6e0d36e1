"""Shared fixtures: real Fashion-MNIST files, a real open_clip model trained for a few seconds."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MICRO = "mmcoa-test-micro"


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    """A prepared, stratified Fashion-MNIST subset (4000 train / 400 test) read by torchvision."""
    from mmcoa.data import prepare

    root = tmp_path_factory.mktemp("fmnist")
    prepare("fashion_mnist", root / "prepared", n_train=4000, n_test=400, seed=0, root=root / "raw")
    return root / "prepared"


@pytest.fixture(scope="session")
def fmnist(fmnist_dir):
    from mmcoa.data import load_prepared

    return load_prepared(fmnist_dir, "train"), load_prepared(fmnist_dir, "test")


@pytest.fixture(scope="session")
def _trained_micro(fmnist):
    """The micro open_clip CLIP, contrastively trained from scratch for 150 steps (~75% zero-shot)."""
    from mmcoa.defenses import DefenseContext, create_defense
    from mmcoa.models import create_model
    from mmcoa.train import TrainConfig, train

    train_set, _ = fmnist
    torch.manual_seed(0)
    model = create_model(MICRO)
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], same_class_targets=True)
    cfg = TrainConfig(steps=150, batch_size=256, lr=1e-3, optimizer="adamw", warmup_steps=20, schedule="cosine")
    train(model, create_defense("clean", model, ctx), train_set, cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture
def trained_model(_trained_micro):
    """A fresh copy per test, so a test may train or modify it."""
    return copy.deepcopy(_trained_micro)


@pytest.fixture
def classifier(trained_model, fmnist):
    from mmcoa.zeroshot import ZeroShotClassifier

    _, test_set = fmnist
    return ZeroShotClassifier.from_prompts(trained_model, test_set.classnames, test_set.templates[:1])
