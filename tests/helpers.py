"""Helpers shared by the attack tests: test images, accuracy, and the module torchattacks attacks."""

from __future__ import annotations

import torch

from mmcoa.zeroshot import predict


def first_test_images(fmnist, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST test images (float, [0, 1]) and their labels."""
    _, test_set = fmnist
    return test_set.float_images(slice(0, n)), test_set.labels[:n]


def accuracy(classifier, images, labels) -> float:
    """Top-1 zero-shot accuracy in percent."""
    return 100.0 * (predict(classifier, images) == labels).float().mean().item()


class AsLogits(torch.nn.Module):
    """A zero-shot classifier as the module torchattacks wants: images -> logits."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images):
        return self.classifier(images)
