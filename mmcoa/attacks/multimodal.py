"""Multimodal attacks on zero-shot classification: image and text perturbed together.

Each sample's image is perturbed within the image budget and the prompt of its true class within
the text budget (the per-sample threat model); the sample counts as robust only if the pair is
still classified correctly. Three ways to combine the two sides:

* ``independent``: both attacks from clean inputs, then combined (the MMCoA authors' evaluation);
* ``co_attack`` (Zhang et al., ACM MM 2022): text first, then the image attack pushes the image away
  from the *adversarial* text embedding (collaborative);
* ``joint``: ``rounds`` alternations of best responses: the text against the current adversarial
  image, then the image against the current adversarial text (each from its clean input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from mmcoa.attacks.base import Attack, AttackParams, attack_class, create_attack, register_attack
from mmcoa.attacks.objectives import ZeroShotImageObjective, ZeroShotTextObjective
from mmcoa.zeroshot import ZeroShotClassifier


@dataclass
class ZeroShotAttackResult:
    """Outcome on one batch: adversarial inputs and the final logits."""

    images: torch.Tensor
    texts: list[str] | None
    logits: torch.Tensor

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        return self.logits.argmax(1) == labels


class ZeroShotTask:
    """A batch of zero-shot classification under attack: classifier, class prompts, the class
    names a text attack must leave alone (``protected``), and the class names in label order
    (``classnames``; the typographic attack writes them into images)."""

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        prompts: list[str],
        protected: set[str] | None = None,
        classnames: list[str] | None = None,
    ):
        self.classifier, self.prompts, self.protected = classifier, prompts, protected or set()
        self.classnames = classnames

    def texts_for(self, labels: torch.Tensor) -> list[str]:
        return [self.prompts[i] for i in labels.tolist()]

    def true_emb(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.model.encode_texts(texts)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, labels: torch.Tensor, texts: list[str] | None) -> torch.Tensor:
        true = None if texts is None else self.true_emb(texts)
        return self.classifier(images, true, labels if texts is not None else None)

    def image_feats(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.model.encode_image(images)

    # one side at a time ------------------------------------------------------------------

    def attack_image(self, attack, images, labels, texts=None, early_exit=True):
        true = None if texts is None else self.true_emb(texts)
        objective = ZeroShotImageObjective(
            self.classifier, labels, true_emb=true, prompts=self.prompts, classnames=self.classnames
        )
        return attack.perturb(images, objective, early_exit=early_exit)

    def attack_text(self, attack, images, labels, texts=None):
        texts = texts if texts is not None else self.texts_for(labels)
        objective = ZeroShotTextObjective(self.classifier, self.image_feats(images), labels)
        return attack.perturb(texts, objective, protected=self.protected)


def run_zeroshot_attack(attack: Attack, task: ZeroShotTask, images: torch.Tensor, labels: torch.Tensor) -> ZeroShotAttackResult:
    """Run any registered attack (image, text or multimodal) on one batch of zero-shot classification."""
    return _RUNNERS[attack.kind](attack, task, images, labels)


def _run_image(attack, task, images, labels):
    adv = task.attack_image(attack, images, labels)
    return ZeroShotAttackResult(adv, None, task.logits(adv, labels, None))


def _run_text(attack, task, images, labels):
    texts = task.attack_text(attack, images, labels)
    return ZeroShotAttackResult(images, texts, task.logits(images, labels, texts))


def _run_multimodal(attack, task, images, labels):
    return attack.run(task, images, labels)


_RUNNERS = {"image": _run_image, "text": _run_text, "multimodal": _run_multimodal}


class SubAttack(AttackParams):
    """A nested attack: a registered name plus its params."""

    attack: str
    params: dict[str, Any] = Field(default_factory=dict)


class MultimodalParams(AttackParams):
    mode: Literal["independent", "co_attack", "joint"] = "co_attack"
    image: SubAttack = SubAttack(attack="pgd", params={"eps_255": 1, "step_255": 0.25, "steps": 10})
    text: SubAttack = SubAttack(attack="word", params={"word_budget": 1})
    rounds: int = Field(2, ge=1, description="Alternations of text and image attack for mode=joint")


@register_attack("multimodal")
class MultimodalAttack(Attack):
    """Image + text attack on zero-shot classification (see module docstring for the modes).

    Args: ``mode``; ``image`` and ``text``: nested attack specs ``{attack: name, params: {...}}``;
    ``rounds`` for ``joint``. Budgets are those of the nested attacks, never exceeded.
    """

    kind = "multimodal"
    Params = MultimodalParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        p = self.params
        if attack_class(p.image.attack).kind != "image" or attack_class(p.text.attack).kind != "text":
            raise ValueError("multimodal: 'image' must name an image attack and 'text' a text attack")
        self.image_attack = create_attack(p.image.attack, **p.image.params)
        self.text_attack = create_attack(p.text.attack, **p.text.params)

    def threat_model(self) -> dict[str, Any]:
        return {"attack": self.name, "side": "both", "mode": self.params.mode,
                "image": self.image_attack.threat_model(), "text": self.text_attack.threat_model()}

    def run(self, task: ZeroShotTask, images: torch.Tensor, labels: torch.Tensor) -> ZeroShotAttackResult:
        mode = self.params.mode
        if mode == "independent":
            adv_img = task.attack_image(self.image_attack, images, labels)
            texts = task.attack_text(self.text_attack, images, labels)
        elif mode == "co_attack":
            texts = task.attack_text(self.text_attack, images, labels)
            adv_img = task.attack_image(self.image_attack, images, labels, texts)
        else:
            adv_img, texts = self._joint(task, images, labels)
        return ZeroShotAttackResult(adv_img, texts, task.logits(adv_img, labels, texts))

    def _joint(self, task, images, labels):
        # Alternating best responses: each round re-attacks the text (from the clean prompt) against
        # the current adversarial image, then the image (from the clean image) against the current
        # adversarial text. Both attacks start from clean inputs, so both budgets hold.
        x, texts = images, None
        for _ in range(self.params.rounds):
            texts = task.attack_text(self.text_attack, x, labels)
            x = task.attack_image(self.image_attack, images, labels, texts)
        return x, texts
