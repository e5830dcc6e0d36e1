"""Invariants of the text side of the evaluation, over every registered text and multimodal attack,
every offline candidate source and every registered dataset's class names:

* label preservation: no attack returns a prompt whose class-name words differ from the clean
  prompt's (same words at the same positions, none deleted, merged or introduced);
* zero budget is the identity: a zero word/char budget (both sides zero for multimodal attacks)
  gives the clean logits exactly, per sample, in every prompt mode (first template, the dataset's
  ensemble, its paper template, explicit templates).
"""

from __future__ import annotations

import inspect
import string

import pytest
import torch

from mmcoa.attacks import ObjectiveOutput, create_attack, list_attacks
from mmcoa.attacks.candidates import list_sources
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.data.classnames import field_templates
from mmcoa.data.registry import default_root, dataset_spec, list_datasets
from mmcoa.models import create_model
from mmcoa.zeroshot import PROMPT_SETS, select_templates

MICRO = "mmcoa-test-micro"
# Templates of the shapes the registered datasets use: quoted digits, trailing punctuation, none.
TEMPLATES = ['a photo of the number: "{c}".', "a blurry photo of the small {c}.", "This is a photo of a {c}",
             "a low resolution grayscale photo of a {c}."]
BUDGET_KEY = {"word": "word_budget", "char": "char_budget"}  # every registered text attack's budget
MODES = ["independent", "co_attack", "joint"]
ZERO_IMAGE = {"attack": "pgd", "params": {"eps_255": 0, "steps": 2}}


# --- the oracle: class-name words of a prompt ------------------------------------------------


def _core(token: str) -> str:
    return token.strip(string.punctuation + "\u201c\u201d").lower()


def label_words(classnames) -> set[str]:
    """Every word of every class name, and the hyphen parts: what a prompt's label is spelled with."""
    out = set()
    for name in classnames:
        for token in name.lower().split():
            out.add(_core(token))
            out.update(p for p in _core(token).replace("'", "-").split("-") if len(p) >= 3)
    return out - {""}


def assert_label_kept(clean: str, adv: str, words: set[str]) -> None:
    a, b = clean.split(), adv.split()
    assert len(a) == len(b), f"words added or merged: {clean!r} -> {adv!r}"
    for x, y in zip(a, b):
        if _core(x) in words or _core(y) in words:
            assert _core(x) == _core(y), f"class-name word changed: {clean!r} -> {adv!r}"


# --- attacks and sources ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory):
    """A randomly initialised tiny BertForMaskedLM and its tokenizer, saved where mlm_name can load them.
    Its vocabulary holds the template words and digits, so it proposes them anywhere (a class-name
    position included)."""
    import transformers
    from transformers import BertConfig, BertForMaskedLM

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"0123456789", "a", "of", "the", "this", "is", "photo",
             "picture", "number", "blurry", "small", "big", "low", "resolution", "grayscale", "image", "shirt", "coat",
             "dress", "bag", "boot", "face", "tree", "bird", "##s", "##y", ".", '"', ":"]
    root = tmp_path_factory.mktemp("invariant_mlm")
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok_cls = getattr(transformers, "BertTokenizerFast", None) or transformers.BertTokenizer
    arg = "vocab" if "vocab" in inspect.signature(tok_cls.__init__).parameters else "vocab_file"
    tok_cls(**{arg: str(root / "vocab.txt")}).save_pretrained(root)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForMaskedLM(cfg).eval().save_pretrained(root)
    return str(root)


def text_attack_specs(budget: int, mlm_dir: str) -> list[tuple[str, str, dict]]:
    """(id, attack name, params) for every registered text attack and, for "word", every candidate source."""
    specs = []
    for name in list_attacks(kind="text"):
        assert name in BUDGET_KEY, f"text attack '{name}' is not covered: add its budget parameter to BUDGET_KEY"
        params = {BUDGET_KEY[name]: budget}
        if name == "word":
            for source in list_sources():
                extra = {"mlm_name": mlm_dir} if source == "mlm" else {}
                specs.append((f"word-{source}", name, {**params, "candidates": source, "k": 5, **extra}))
        else:
            specs.append((name, name, {**params, "max_candidates": 20}))
    return specs


def multimodal_names() -> list[str]:
    return list_attacks(kind="multimodal")


def static_classnames() -> dict[str, list[str]]:
    """Every registered dataset whose class names are known without its files (offline)."""
    out = {n: list(dataset_spec(n).classnames) for n in list_datasets() if dataset_spec(n).classnames}
    assert {"digits", "fashion_mnist"} <= set(out)
    return out


class EditsClassNames:
    """The adversary the protection rule exists for: it scores a prompt by how much of its clean
    class-name words it changed (and, far less, by any other change), so an attack free to edit
    class names always would. Never fooled, so the whole budget is used."""

    def __init__(self, clean: list[str], words: set[str]):
        self.clean, self.words = clean, words

    def _score(self, text: str, clean: str) -> float:
        a, b = clean.split(), text.split()
        if len(a) != len(b):
            return 100.0
        label = sum(_core(x) != _core(y) for x, y in zip(a, b) if _core(x) in self.words or _core(y) in self.words)
        other = sum(x != y for x, y in zip(a, b))
        return 10.0 * label + 0.1 * other + 0.001 * len(text)

    def __call__(self, texts: list[str], owners: torch.Tensor) -> ObjectiveOutput:
        loss = torch.tensor([self._score(t, self.clean[o]) for t, o in zip(texts, owners.tolist())])
        return ObjectiveOutput(loss, torch.zeros(len(texts), dtype=torch.bool))


# --- label preservation ----------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(static_classnames()))
def test_no_text_attack_edits_a_class_name(dataset, tiny_mlm_dir):
    """Every text attack, every source, against an objective that rewards editing the label."""
    classnames = static_classnames()[dataset]
    words = label_words(classnames)
    prompted = classnames[:: max(1, len(classnames) // 50)]  # at most ~50 prompts; all names protected
    texts = [t.format(c=c) for t in TEMPLATES[:2] for c in prompted]
    for spec_id, name, params in text_attack_specs(2, tiny_mlm_dir):
        attack = create_attack(name, **params)
        adv = attack.perturb(texts, EditsClassNames(texts, words), protected=classnames)
        assert adv != texts, f"{spec_id} changed nothing: the check would be empty"
        for clean, out in zip(texts, adv):
            assert_label_kept(clean, out, words)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model(MICRO).eval()


@pytest.fixture(scope="module")
def digits():
    """The real digits test split (sklearn's, offline): 40 images in [0, 1] as RGB, and their labels."""
    ds = dataset_spec("digits").open(default_root(), "test", False)
    x = torch.stack([ds.image(i) for i in range(40)]).float().div(255.0)
    return ds, x.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(ds.targets[:40])


@pytest.mark.parametrize("mode", MODES)
def test_multimodal_text_side_keeps_class_names(micro, digits, mode, tiny_mlm_dir):
    """The text side of every multimodal attack, on a real model and the digits prompts (one-character
    class names), with every text attack spec."""
    ds, x, y = digits
    task = ZeroShotTask.from_templates(micro, ds.classnames, TEMPLATES[:2])
    words = label_words(ds.classnames)
    image = {"attack": "pgd", "params": {"eps_255": 2, "steps": 2}}
    for name in multimodal_names():
        for spec_id, text_name, params in text_attack_specs(2, tiny_mlm_dir):
            attack = create_attack(name, mode=mode, image=image, text={"attack": text_name, "params": params})
            res = run_zeroshot_attack(attack, task, x, y)
            for clean, adv in zip(task.prompts_for(y), res.prompts):
                for a, b in zip(clean, adv):
                    assert_label_kept(a, b, words)


# --- zero budget is the identity -------------------------------------------------------------


def prompt_modes(ds) -> dict[str, list[str]]:
    """Every named prompt set of the dataset, and explicit templates (several: an ensemble)."""
    modes = {m: select_templates(ds, m) for m in PROMPT_SETS}
    modes["explicit"] = select_templates(ds, templates=field_templates("cifar10", TEMPLATES[0])[:3] + TEMPLATES[:1])
    assert len(modes["explicit"]) == 4
    return modes


def zero_budget_attacks(mlm_dir: str) -> list[tuple[str, object]]:
    out = [(i, create_attack(n, **p)) for i, n, p in text_attack_specs(0, mlm_dir)]
    for name in multimodal_names():
        for mode in MODES:
            for spec_id, text_name, params in text_attack_specs(0, mlm_dir):
                text = {"attack": text_name, "params": params}
                out.append((f"{name}-{mode}-{spec_id}", create_attack(name, mode=mode, image=ZERO_IMAGE, text=text)))
    return out


def test_zero_budget_reproduces_clean_logits_in_every_prompt_mode(micro, digits, tiny_mlm_dir):
    ds, x, y = digits
    attacks = zero_budget_attacks(tiny_mlm_dir)
    for mode, templates in prompt_modes(ds).items():
        task = ZeroShotTask.from_templates(micro, ds.classnames, templates)
        with torch.no_grad():
            clean = task.classifier(x)
        for spec_id, attack in attacks:
            res = run_zeroshot_attack(attack, task, x, y)
            assert torch.equal(res.correct(y), clean.argmax(1) == y), (mode, spec_id)
            assert torch.equal(res.logits, clean), (mode, spec_id)


def test_a_task_refuses_a_classifier_its_prompts_do_not_build(micro, digits):
    """The classifier an attack sees is the one clean accuracy is measured with: an ensemble
    classifier with one template's prompts is rejected, not attacked with the wrong class row."""
    from mmcoa.zeroshot import ZeroShotClassifier, build_prompts

    ds, _, _ = digits
    templates = prompt_modes(ds)["explicit"]
    clf = ZeroShotClassifier.from_prompts(micro, ds.classnames, templates)
    with pytest.raises(ValueError, match="templates"):
        ZeroShotTask(clf, build_prompts(ds.classnames, templates[0]), set(ds.classnames))
    ZeroShotTask(clf, protected=set(ds.classnames), classnames=ds.classnames, templates=templates)
