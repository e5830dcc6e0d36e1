"""Invariants of the retrieval evaluation, over every registered attack that applies to retrieval
(image, text, and multimodal in each of its modes), on a micro open_clip CLIP trained here for a
few seconds on the synthetic fmnist_pairs set:

* attack the reported metric: each reported R@k, in both directions, is at most R@k under the same
  attack aimed at R@k;
* zero budget is the identity: recalls and per-query outcomes equal clean;
* outcomes name their queries, and two evaluations are paired only on the same queries.

An attack of the registry that cannot serve retrieval must be refused with an AttackError.
"""

from __future__ import annotations

import typing

import pytest
import torch

from mmcoa.attacks import AttackError, attack_class, create_attack, list_attacks
from mmcoa.attacks.multimodal import MultimodalParams
from mmcoa.attacks.objectives import RetrievalImageObjective, RetrievalTextObjective
from mmcoa.data.retrieval import open_retrieval
from mmcoa.data.synthetic import COMPOSITIONS, synthetic_pairs
from mmcoa.models import create_model
from mmcoa.retrieval import (
    KS,
    AttackOutcome,
    GalleryMismatch,
    RetrievalTask,
    attack_seed,
    evaluate_retrieval,
    gallery_indices,
    retrieval_outcomes,
    run_retrieval_attack,
)
from test_retrieval import MICRO, _train_on_pairs  # the same micro model and training (tests/ is on sys.path)

N_IMAGES, SEED = 20, 0
PGD = {"eps_255": 4, "step_255": 1, "steps": 3}
# Small budgets of work (not of perturbation) per registered attack; an attack not named here runs
# with its defaults, and multimodal runs in every one of its modes.
SMALL = {
    "pgd": PGD,
    "apgd_ce": {"eps_255": 4, "steps": 3},
    "apgd_t": {"eps_255": 4, "steps": 4, "n_targets": 2},
    "aa": {"eps_255": 4, "steps": 4, "n_targets": 2},
    "square": {"eps_255": 8, "n_queries": 10},
    "char": {"char_budget": 1, "max_candidates": 10},
    "word": {"word_budget": 1},
    "transfer": {"source": MICRO, "attack": "pgd", "params": PGD},
    "multimodal": {"image": {"attack": "pgd", "params": PGD}, "text": {"attack": "word"}, "rounds": 1},
}
# The parameter that sets each kind of budget; setting it to zero must leave every input unchanged.
ZERO = ("eps_255", "word_budget", "char_budget", "opacity")
MODES = typing.get_args(MultimodalParams.model_fields["mode"].annotation)


def registered_configs(zero: bool = False) -> list[tuple[str, dict]]:
    """(attack name, params) for every registered attack; multimodal once per mode."""
    out = []
    for name in list_attacks():
        params = dict(SMALL.get(name, {}))
        if zero:
            params = zero_budget(name, params)
        if name == "multimodal":
            out += [(name, {**params, "mode": mode}) for mode in MODES]
        else:
            out.append((name, params))
    return out


def zero_budget(name: str, params: dict) -> dict:
    fields = attack_class(name).Params.model_fields
    if name == "multimodal":
        image, text = params["image"], params["text"]
        return {**params, "image": {**image, "params": zero_budget(image["attack"], dict(image.get("params", {})))},
                "text": {**text, "params": zero_budget(text["attack"], dict(text.get("params", {})))}}
    if name == "transfer":
        return {**params, "params": zero_budget(params["attack"], dict(params["params"]))}
    budget = [f for f in ZERO if f in fields]
    assert budget, f"attack '{name}': no zero-budget parameter known to this test ({ZERO}); add its own"
    return {**params, **{f: 0 for f in budget}}


def label(name: str, params: dict) -> str:
    return f"{name}_{params['mode']}" if "mode" in params else name


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist_raw")
    torch.manual_seed(0)
    model = _train_on_pairs(create_model(MICRO), synthetic_pairs("train", 2 * len(COMPOSITIONS), seed=0, root=root),
                            steps=40, batch=64)
    test = open_retrieval("fmnist_pairs", "test", root=root)
    return model, test


def _applies(model, name: str, params: dict) -> bool:
    """Does the attack accept the retrieval objectives? (``check``, the guard every ``perturb`` runs first)."""
    attack = create_attack(name, **params)
    text_emb, owners = torch.eye(2, model.embed_dim), torch.tensor([0, 1])
    sides = [(attack.image_attack, "image"), (attack.text_attack, "text")] if attack.kind == "multimodal" else [(attack, attack.kind)]
    try:
        for a, kind in sides:
            a.check(RetrievalImageObjective(model, text_emb, owners) if kind == "image" else RetrievalTextObjective(model, text_emb, owners))
    except AttackError:
        return False
    return True


@pytest.fixture(scope="module")
def retrieval_attacks(setting):
    """The registered attack configurations that serve retrieval (the others are refused)."""
    model, _ = setting
    found = [(label(n, p), n, p) for n, p in registered_configs() if _applies(model, n, p)]
    names = {n for _, n, _ in found}
    assert {"pgd", "word", "char", "multimodal"} <= names, names
    assert {lab for lab, _, _ in found} >= {f"multimodal_{m}" for m in MODES}
    return found


def test_each_reported_recall_is_at_most_the_attack_aimed_at_it(setting, retrieval_attacks):
    model, test = setting
    suite = [(lab, create_attack(name, **params)) for lab, name, params in retrieval_attacks]
    result = evaluate_retrieval(model, test, suite, n_images=N_IMAGES, batch_size=N_IMAGES, seed=SEED, n_examples=0)
    gallery = test.subset(gallery_indices(len(test), N_IMAGES, SEED))
    task = RetrievalTask(model, gallery, N_IMAGES)
    clean = AttackOutcome(task.image_emb(), task.text_emb(gallery.captions))
    above = []
    for lab, attack in suite:
        for k in KS:
            torch.manual_seed(attack_seed(SEED, lab))
            aimed = run_retrieval_attack(attack, task, clean, k)
            reference = retrieval_outcomes(aimed.image_emb, aimed.text_emb, gallery.caption_image)
            for d in ("i2t", "t2i"):
                key = f"{d}_r{k}"
                reported = result.outcomes[lab][key]
                assert result.metrics[f"fmnist_pairs.{lab}.{key}"] == pytest.approx(reported.float().mean().item(), abs=1e-6)
                # A reported recall above the run aimed at it: the report is too kind.
                if int(reported.sum()) > int(reference[key].sum()):
                    above.append(f"{lab} {key}: {reported.float().mean():.3f} vs {reference[key].float().mean():.3f}")
    assert not above, "reported recall above the attack aimed at it: " + "; ".join(above)
    # The fixture is not vacuous: the attacks move recall.
    assert any(result.metrics[f"fmnist_pairs.{lab}.t2i_r1"] < result.metrics["fmnist_pairs.clean.t2i_r1"] for lab, _ in suite)


def test_zero_budget_is_the_identity(setting, retrieval_attacks):
    model, test = setting
    applicable = {lab for lab, _, _ in retrieval_attacks}
    suite = [(label(n, p), create_attack(n, **p)) for n, p in registered_configs(zero=True) if label(n, p) in applicable]
    assert len(suite) == len(applicable)
    result = evaluate_retrieval(model, test, suite, n_images=N_IMAGES, batch_size=N_IMAGES, seed=SEED, n_examples=4)
    clean = result.outcomes["clean"]
    for lab, _ in suite:
        for key, hits in result.outcomes[lab].items():
            assert torch.equal(hits, clean[key]), f"{lab} {key} with zero budget differs from clean"
            assert result.metrics[f"fmnist_pairs.{lab}.{key}"] == result.metrics[f"fmnist_pairs.clean.{key}"]
        if lab in result.captions:
            assert result.captions[lab] == test.subset(result.image_indices).captions, lab
        ex = result.examples[lab]
        if "adversarial_images" in ex:
            assert torch.equal(ex["adversarial_images"], ex["images"]), lab


def test_attacks_that_cannot_serve_retrieval_are_refused(setting, retrieval_attacks):
    model, test = setting
    applicable = {lab for lab, _, _ in retrieval_attacks}
    for name, params in registered_configs():
        if label(name, params) in applicable:
            continue
        with pytest.raises(AttackError) as err:
            evaluate_retrieval(model, test, [(name, create_attack(name, **params))], n_images=2, batch_size=2, seed=SEED)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_outcomes_name_their_queries_and_pair_only_on_the_same_ones(setting):
    model, test = setting
    run = lambda seed: evaluate_retrieval(model, test, [], n_images=12, batch_size=12, seed=seed, n_examples=0)  # noqa: E731
    a, same, other = run(0), run(0), run(1)
    for r in (a, other):
        assert len(r.image_indices) == r.n_images and len(r.caption_image) == len(r.caption_indices) == r.n_captions
        # Each caption query: its dataset caption, whose dataset image is the image query it points to.
        assert [test.captions[j] for j in r.caption_indices.tolist()] == test.subset(r.image_indices).captions
        assert torch.equal(test.caption_image[r.caption_indices], r.image_indices[r.caption_image])
        assert len(r.outcomes["clean"]["t2i_r1"]) == r.n_captions
    assert a.n_images == other.n_images and not torch.equal(a.image_indices, other.image_indices)
    mine, theirs = a.paired(same, "clean", "clean", "t2i_r1")
    assert torch.equal(mine, theirs)
    with pytest.raises(GalleryMismatch, match="different queries.*same gallery"):
        a.paired(other, "clean", "clean", "t2i_r1")
    # Same images, captions in another order: still not the same queries.
    shuffled = evaluate_retrieval(model, test, [], n_images=12, batch_size=12, seed=0, n_examples=0)
    shuffled.caption_indices = shuffled.caption_indices.flip(0)
    with pytest.raises(GalleryMismatch):
        a.paired(shuffled, "clean", "clean", "i2t_r1")
