"""Multimodal attacks on zero-shot classification: image and text perturbed together.

Each sample's image is perturbed within the image budget and the prompts of its true class within
the text budget (the per-sample threat model); the sample counts as robust only if the pair is
still classified correctly. Three ways to combine the two sides:

* ``independent``: both attacks from clean inputs, then combined (the MMCoA authors' evaluation);
* ``co_attack`` (Zhang et al., ACM MM 2022, the reference's ``run_before_fusion``): the text is
  attacked ON ITS OWN first (no image, no label: it maximises KL(softmax(clean text emb) ||
  softmax(adversarial text emb)), :class:`EmbeddingKLObjective`); then the image attack pushes the
  image embedding away from its clean embedding and from the adversarial text embedding
  (:class:`ZeroShotCoAttackObjective`, weight ``alpha``). In zero-shot classification "the text" of
  a sample is the prompt of its true class (every template's prompt, with an ensemble), and "the
  adversarial text embedding" is the true class's embedding built from the attacked prompts. Two
  things are ours, not the reference's: the image attack stops early once the pair is misclassified
  (the reported outcome), and the pair is judged by the classifier;
* ``joint``: ``rounds`` alternations of best responses: the text against the current adversarial
  image, then the image against the current adversarial text (each from its clean input).

Prompt ensembles: the classifier scores class c with ``ensemble`` of its template prompts' embeddings
(:mod:`mmcoa.zeroshot`); an attacked true class is scored with the same rule over its attacked
prompts, each template's prompt edited within the text budget (templates in turn, each against the
others as they stand). A prompt left unchanged keeps the clean embedding bit for bit, so a zero budget
reproduces the clean logits exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from mmcoa.attacks.base import Attack, AttackParams, attack_class, create_attack, register_attack
from mmcoa.attacks.objectives import (
    EmbeddingKLObjective,
    ZeroShotCoAttackObjective,
    ZeroShotImageObjective,
    ZeroShotTextObjective,
)
from mmcoa.models import distinct
from mmcoa.zeroshot import ZeroShotClassifier, build_prompts, ensemble, template_embeddings

Prompts = list[list[str]]  # [T][B]: each template's prompt of each sample's true class


@dataclass
class ZeroShotAttackResult:
    """Outcome on one batch: adversarial inputs and the final logits. ``texts`` are the first
    template's (adversarial) prompts; ``prompts`` every template's, [T][B]."""

    images: torch.Tensor
    texts: list[str] | None
    logits: torch.Tensor
    prompts: Prompts | None = None

    def correct(self, labels: torch.Tensor) -> torch.Tensor:
        return self.logits.argmax(1) == labels


class ZeroShotTask:
    """A batch of zero-shot classification under attack: the classifier, the class prompts behind
    it, the class names a text attack must leave alone (``protected``), and the class names in label
    order (``classnames``; the typographic attack writes them into images).

    ``prompts`` [C] are the class prompts of one template; with ``templates`` (and ``classnames``)
    the prompts are every template's, and the classifier must be their ensemble. The task checks that
    ``classifier`` is exactly the classifier its prompts build (so an attack sees the classifier
    clean accuracy is measured with) and raises ValueError otherwise.
    """

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        prompts: list[str] | None = None,
        protected: set[str] | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
    ):
        if templates:
            if classnames is None:
                raise ValueError("templates need classnames to build the prompts")
            self.prompt_sets = [build_prompts(list(classnames), t) for t in templates]
            self.template_emb = template_embeddings(classifier.model, list(classnames), list(templates))
        elif prompts is not None:
            self.prompt_sets = [list(prompts)]
            self.template_emb = template_embeddings(classifier.model, list(prompts), ["{c}"])
        else:
            raise ValueError("a zero-shot task needs its class prompts (prompts, or classnames and templates)")
        built = ensemble(self.template_emb).to(classifier.class_emb.device)
        if built.shape != classifier.class_emb.shape or not torch.allclose(built, classifier.class_emb, atol=1e-4):
            raise ValueError("the classifier's class embeddings are not the mean of these prompts' embeddings "
                             "(a prompt ensemble?): pass the templates it was built with (templates=...)")
        self.classifier, self.protected, self.classnames = classifier, protected or set(), classnames
        self.prompts = self.prompt_sets[0]

    @classmethod
    def from_templates(cls, model, classnames: list[str], templates: list[str], protected: set[str] | None = None,
                       **classifier_kw) -> ZeroShotTask:
        """The classifier of ``templates`` and its task, class names protected unless told otherwise."""
        clf = ZeroShotClassifier.from_prompts(model, list(classnames), list(templates), **classifier_kw)
        prot = set(classnames) if protected is None else protected
        return cls(clf, protected=prot, classnames=list(classnames), templates=list(templates))

    @property
    def n_templates(self) -> int:
        return len(self.prompt_sets)

    def texts_for(self, labels: torch.Tensor) -> list[str]:
        """The first template's prompt of each sample's true class."""
        return self.prompts_for(labels)[0]

    def prompts_for(self, labels: torch.Tensor) -> Prompts:
        """Every template's prompt of each sample's true class, [T][B]."""
        ys = labels.tolist()
        return [[p[y] for y in ys] for p in self.prompt_sets]

    def prompt_emb(self, prompts: Prompts, labels: torch.Tensor) -> torch.Tensor:
        """[T, B, D] unit-norm embeddings of the prompts; an unchanged prompt keeps its clean row."""
        out = self.template_emb[:, labels.to(self.template_emb.device)].clone()
        clean = self.prompts_for(labels)
        todo = [(t, i) for t, (adv, ref) in enumerate(zip(prompts, clean))
                for i, (a, r) in enumerate(zip(adv, ref)) if a != r]
        if todo:
            unique, rows = distinct([prompts[t][i] for t, i in todo])
            with torch.no_grad():
                emb = self.classifier.model.encode_texts(unique)[rows.to(out.device)]
            for (t, i), e in zip(todo, emb):
                out[t, i] = e.to(out.dtype)
        return out

    def true_emb(self, prompts: Prompts, labels: torch.Tensor) -> torch.Tensor:
        """[B, D] the true class's embedding from its (adversarial) prompts, built as the classifier
        builds every class embedding; a sample whose prompts are all unchanged gets the clean row."""
        emb = ensemble(self.prompt_emb(prompts, labels))
        clean = self.prompts_for(labels)
        same = torch.tensor([all(p[i] == c[i] for p, c in zip(prompts, clean)) for i in range(len(labels))],
                            device=emb.device)
        class_emb = self.classifier.class_emb[labels.to(emb.device)].to(emb.dtype)
        return torch.where(same.view(-1, 1), class_emb, emb)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, labels: torch.Tensor, prompts: Prompts | None) -> torch.Tensor:
        true = None if prompts is None else self.true_emb(prompts, labels)
        return self.classifier(images, true, labels if prompts is not None else None)

    def image_feats(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.model.encode_image(images, normalize=normalize)

    def result(self, images: torch.Tensor, labels: torch.Tensor, prompts: Prompts | None) -> ZeroShotAttackResult:
        texts = None if prompts is None else prompts[0]
        return ZeroShotAttackResult(images, texts, self.logits(images, labels, prompts), prompts)

    # one side at a time ------------------------------------------------------------------

    def attack_image(self, attack, images, labels, prompts: Prompts | None = None, early_exit=True):
        true = None if prompts is None else self.true_emb(prompts, labels)
        objective = ZeroShotImageObjective(
            self.classifier, labels, true_emb=true, prompts=self.prompts, classnames=self.classnames
        )
        return attack.perturb(images, objective, early_exit=early_exit)

    def attack_text(self, attack, images, labels) -> Prompts:
        """Every template's true-class prompt attacked against ``images``, templates in turn: each
        maximises the margin of the classifier with the other templates as they stand."""
        prompts = self.prompts_for(labels)
        feats = self.image_feats(images)
        current = self.template_emb[:, labels.to(self.template_emb.device)].clone() if self.n_templates > 1 else None
        for t in range(self.n_templates):
            objective = ZeroShotTextObjective(self.classifier, feats, labels, current, slot=t)
            prompts[t] = attack.perturb(prompts[t], objective, protected=self.protected)
            if current is not None:
                current[t] = self.prompt_emb(prompts, labels)[t]
        return prompts

    def attack_text_alone(self, attack, labels) -> Prompts:
        """Every true-class prompt attacked on its own (Co-Attack's text step): away from its clean
        embedding, no image and no label."""
        prompts = self.prompts_for(labels)
        model = self.classifier.model
        for t in range(self.n_templates):
            with torch.no_grad():
                clean = model.encode_text(model.tokenize(prompts[t]), normalize=False)
            prompts[t] = attack.perturb(prompts[t], EmbeddingKLObjective(model, clean), protected=self.protected)
        return prompts


def run_zeroshot_attack(attack: Attack, task: ZeroShotTask, images: torch.Tensor, labels: torch.Tensor) -> ZeroShotAttackResult:
    """Run any registered attack (image, text or multimodal) on one batch of zero-shot classification."""
    return _RUNNERS[attack.kind](attack, task, images, labels)


def _run_image(attack, task, images, labels):
    return task.result(task.attack_image(attack, images, labels), labels, None)


def _run_text(attack, task, images, labels):
    return task.result(images, labels, task.attack_text(attack, images, labels))


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
    alpha: float = Field(3.0, ge=0, description="co_attack: weight of the away-from-adversarial-text term")


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
            prompts = task.attack_text(self.text_attack, images, labels)
        elif mode == "co_attack":
            adv_img, prompts = self._co_attack(task, images, labels)
        else:
            adv_img, prompts = self._joint(task, images, labels)
        return task.result(adv_img, labels, prompts)

    def _co_attack(self, task, images, labels):
        # The text on its own first; then the image away from its clean embedding and from the
        # adversarial true-class embedding (module docstring).
        prompts = task.attack_text_alone(self.text_attack, labels)
        objective = ZeroShotCoAttackObjective(task.classifier, labels, task.image_feats(images, normalize=False),
                                              task.true_emb(prompts, labels), self.params.alpha)
        return self.image_attack.perturb(images, objective, early_exit=True), prompts

    def _joint(self, task, images, labels):
        # Alternating best responses: each round re-attacks the text (from the clean prompts) against
        # the current adversarial image, then the image (from the clean image) against the current
        # adversarial text. Both attacks start from clean inputs, so both budgets hold.
        x, prompts = images, None
        for _ in range(self.params.rounds):
            prompts = task.attack_text(self.text_attack, x, labels)
            x = task.attack_image(self.image_attack, images, labels, prompts)
        return x, prompts
