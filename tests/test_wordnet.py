"""WordNet synonym candidates (offline, Debian's wordnet-base via nltk) and the held-out text threat
models: larger word budgets, larger candidate sets and character edits, with every candidate source."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import AttackError, create_attack
from mmcoa.attacks.candidates import STOP_WORDS, list_sources, word_variants
from mmcoa.attacks.objectives import ZeroShotTextObjective
from mmcoa.attacks.text import Words, protected_words
from mmcoa.attacks.wordnet import LEXNAMES, WordNetMissing, lexnames_text, load_wordnet, prepare_corpus, synonyms
from mmcoa.zeroshot import ZeroShotClassifier

N_IMAGES = 64
TEMPLATE = "a blurry photo of the small {c}."


def changed_words(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = Words(a).cores, Words(b).cores
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


# --- the corpus -------------------------------------------------------------------------------


def test_corpus_copy_lexnames_and_synonyms(tmp_path):
    root = prepare_corpus(data_root=tmp_path)
    lines = (root / "lexnames").read_text().splitlines()
    assert len(lines) == 45 == len(LEXNAMES)
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[44] == "44\tadj.ppl\t3"
    assert not (root / "data.noun").is_symlink()  # nltk resolves links out of its data folders
    # lemma names of the word's synsets (the nltk reader over the default cache copy)
    assert {"photograph", "picture", "pic", "exposure"} == set(synonyms("photo"))
    assert {"handbag", "purse", "pocketbook"} <= set(synonyms("bag"))
    assert "photo" not in synonyms("photo")
    assert load_wordnet().synsets("sneaker")  # the noun index is read


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(WordNetMissing, match="apt-get install wordnet-base"):
        prepare_corpus(source=tmp_path / "nowhere", data_root=tmp_path)
    assert lexnames_text().count("\n") == 45


def test_source_registry():
    assert {"glove", "mlm", "wordnet", "char"} <= set(list_sources())
    with pytest.raises(AttackError, match="wordnet"):  # the error lists the registered sources
        create_attack("word", candidates="thesaurus")


def test_wordnet_never_offers_a_class_name_nor_the_word(fmnist):
    _, test = fmnist
    classnames = list(test.classnames)
    prot = protected_words(classnames)
    banned = set().union(*(word_variants(w) for w in prot))
    banned |= {v for w in prot for s in synonyms(w) for v in word_variants(s)}
    attack = create_attack("word", candidates="wordnet", k=50)
    offered = 0
    for c in classnames:
        text = TEMPLATE.format(c=c)
        orig = Words(text).cores
        for h in attack.neighbourhood(text, classnames):
            (old, new), = changed_words(text, h)
            offered += 1
            assert new.lower() != old.lower()
            assert new.lower() not in banned, (old, new)
            assert old.lower() not in prot and old.lower() not in STOP_WORDS
            assert new.lower() in synonyms(old)  # a lemma name of one of the word's synsets
        assert orig == Words(text).cores
    assert offered > 0
    # without protection the synonyms of class words are offered (the rule is what removes them)
    free = {Words(h).cores[-1] for h in attack.neighbourhood("a photo of a bag.")}
    assert {"handbag", "purse"} <= free
    assert not {"handbag", "purse"} & {Words(h).cores[-1] for h in attack.neighbourhood("a photo of a bag.", classnames)}


# --- held-out threat models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_mlm(tmp_path_factory, fmnist):
    """A small random BertForMaskedLM over the template's words, the class words and filler words."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    _, test = fmnist
    words = set(TEMPLATE.replace("{c}.", "").split()) | set(" ".join(test.classnames).lower().replace("-", " ").split())
    words |= set("picture image shot blurred fuzzy little tiny large image snapshot dark bright old new red".split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "-"] + sorted(words)
    root = tmp_path_factory.mktemp("random_mlm")
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).save_pretrained(root)
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def zero_shot(_trained_micro, fmnist):
    _, test = fmnist
    model = _trained_micro.eval()
    labels = test.labels[:N_IMAGES]
    with torch.no_grad():
        feats = model.encode_image(test.float_images(slice(0, N_IMAGES)))
    clf = ZeroShotClassifier.from_prompts(model, test.classnames, [TEMPLATE])
    texts = [TEMPLATE.format(c=test.classnames[y]) for y in labels.tolist()]
    return ZeroShotTextObjective(clf, feats, labels), texts, list(test.classnames)


@pytest.mark.parametrize("source", ["glove", "wordnet", "mlm", "char"])
@pytest.mark.parametrize("budget", [2, 3])
def test_word_budgets_and_k50_with_every_source(source, budget, zero_shot, random_mlm):
    objective, texts, classnames = zero_shot
    extra = {"mlm_name": random_mlm} if source == "mlm" else {}
    attack = create_attack("word", candidates=source, word_budget=budget, k=50, **extra)
    adv = attack.perturb(texts, objective, protected=classnames)
    prot = protected_words(classnames)
    banned = set().union(*(word_variants(w) for w in prot))
    n_changed = [len(changed_words(t, a)) for t, a in zip(texts, adv)]
    assert max(n_changed) <= budget and sum(n_changed) > 0
    for t, a in zip(texts, adv):
        for old, new in changed_words(t, a):
            assert old.lower() not in prot and old.lower() not in STOP_WORDS
            assert new.lower() not in banned and new.lower() not in STOP_WORDS
    idx = torch.arange(len(texts))
    assert objective(adv, idx).fooled.sum() >= objective(texts, idx).fooled.sum()
    assert objective(adv, idx).loss.mean() > objective(texts, idx).loss.mean()
    assert attack.stats.calls > 0 and max(attack.stats.per_round) <= len(texts) * 50 * 6


def test_char_budget_three(zero_shot):
    from mmcoa.attacks.candidates import levenshtein

    objective, texts, classnames = zero_shot
    adv = create_attack("char", char_budget=3, max_candidates=50).perturb(texts, objective, protected=classnames)
    prot = protected_words(classnames)
    assert sum(a != t for a, t in zip(adv, texts)) > 0
    for t, a in zip(texts, adv):
        pairs = changed_words(t, a)
        assert sum(levenshtein(x, y) for x, y in pairs) <= 3
        assert all(new.lower() not in prot for _, new in pairs)
