"""Text attacks: budgets, the protection rule, batching, the masked-LM path (offline) and real effect
on a trained open_clip model."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import AttackError, ObjectiveOutput, create_attack, list_attacks
from mmcoa.attacks.candidates import STOP_WORDS, MaskedLMCandidates, levenshtein
from mmcoa.attacks.objectives import EmbeddingKLObjective, ZeroShotTextObjective
from mmcoa.attacks.text import Words, protected_words
from mmcoa.zeroshot import ZeroShotClassifier

N_IMAGES = 200


# --- helpers ---------------------------------------------------------------------------------


def changed_words(a: str, b: str) -> list[tuple[str, str]]:
    wa, wb = Words(a).cores, Words(b).cores
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


class CountingObjective:
    """Wraps an objective; records the size of each call."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def __call__(self, texts, owners):
        self.sizes.append(len(texts))
        return self.inner(texts, owners)


class OneAtATime:
    """The same objective, called once per candidate text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, texts, owners):
        outs = [self.inner([t], owners[i : i + 1]) for i, t in enumerate(texts)]
        self.calls += len(outs)
        fooled = None if outs[0].fooled is None else torch.cat([o.fooled for o in outs])
        return ObjectiveOutput(torch.cat([o.loss for o in outs]), fooled)


class WordLikes:
    """Toy objective: sample i wants the word ``likes[i]``; fooled once it appears."""

    def __init__(self, likes):
        self.likes = likes

    def __call__(self, texts, owners):
        hit = torch.tensor([float(self.likes[o] in t.lower().replace(".", " ").split()) for t, o in zip(texts, owners.tolist())])
        return ObjectiveOutput(hit + 0.01 * torch.tensor([len(t) for t in texts], dtype=torch.float), hit > 0)


@pytest.fixture
def zero_shot(trained_model, fmnist):
    """(objective factory, labels, classnames): per-sample threat model on 200 test images."""
    _, test = fmnist
    model = trained_model.eval()
    labels = test.labels[:N_IMAGES]
    with torch.no_grad():
        feats = model.encode_image(test.float_images(slice(0, N_IMAGES)))

    def make(template):
        clf = ZeroShotClassifier.from_prompts(model, test.classnames, [template])
        texts = [template.format(c=test.classnames[y]) for y in labels.tolist()]
        return ZeroShotTextObjective(clf, feats, labels), texts

    return make, labels, test.classnames


def fooled_rate(objective, texts) -> float:
    return objective(texts, torch.arange(len(texts))).fooled.float().mean().item()


def exhaustive_success(attack, objective, texts, protected) -> float:
    """Success of the best single substitution from the same candidate set, all scored in one call."""
    hoods = {t: attack.neighbourhood(t, protected) for t in set(texts)}
    clean = objective(texts, torch.arange(len(texts))).fooled
    cand, owners = [], []
    for i, t in enumerate(texts):
        cand += hoods[t]
        owners += [i] * len(hoods[t])
    out = objective(cand, torch.tensor(owners))
    hit = clean.clone()
    hit.index_put_((torch.tensor(owners),), out.fooled, accumulate=True)
    return (hit > 0).float().mean().item()


# --- contract, tokenisation ------------------------------------------------------------------


def test_registry_and_params():
    assert {"word", "char"} <= set(list_attacks("text"))
    w = create_attack("word", word_budget=2, candidates="glove", k=5, cos_threshold=0.6, mlm_name="x")
    assert w.threat_model()["word_budget"] == 2 and w.threat_model()["side"] == "text"
    with pytest.raises(AttackError, match="candidates"):
        create_attack("word", candidates="thesaurus")
    with pytest.raises(AttackError, match="unknown parameter"):
        create_attack("char", word_budget=1)
    assert create_attack("word", word_budget=0).perturb(["a photo of a cat."], WordLikes(["dog"])) == ["a photo of a cat."]
    assert create_attack("word").perturb([], WordLikes([])) == []


def test_words_keep_punctuation_and_whitespace():
    w = Words('  "A photo of a t-shirt."  (ok)')
    assert w.cores == ["A", "photo", "of", "a", "t-shirt", "ok"]
    assert w.render(w.cores) == '  "A photo of a t-shirt."  (ok)'
    assert w.replaced(4, "coat") == '  "A photo of a coat."  (ok)'
    assert protected_words(["ankle boot", "T-shirt"]) == {"ankle", "boot", "t-shirt", "shirt"}


def test_stop_words_case_insensitive_and_case_restored():
    texts = ["This Is A Photo OF The shirt", "this is a photo of the shirt"]
    likes = ["picture", "picture"]
    adv = create_attack("word", k=10).perturb(texts, WordLikes(likes))
    assert adv == ["This Is A Picture OF The shirt", "this is a picture of the shirt"]
    for a, t in zip(adv, texts):
        assert all(x.lower() not in STOP_WORDS for x, _ in changed_words(t, a))


def test_duplicates_scored_per_sample():
    """Identical texts with different objective states get different answers (owners respected)."""
    texts = ["a photo of a coat."] * 4
    likes = ["picture", "photograph", "picture", "nothing"]
    adv = create_attack("word").perturb(texts, WordLikes(likes))
    assert adv[:3] == ["a picture of a coat.", "a photograph of a coat.", "a picture of a coat."]
    assert len(changed_words(texts[3], adv[3])) <= 1


# --- budgets and protection on the trained model ---------------------------------------------


def test_word_budget_protection_and_stop_words(zero_shot):
    make, _, classnames = zero_shot
    objective, texts = make("a blurry photo of the small {c}.")
    protected = protected_words(classnames)
    attack = create_attack("word", word_budget=2, k=10)
    adv = attack.perturb(texts, objective, protected=classnames)
    n_changed = [len(changed_words(t, a)) for t, a in zip(texts, adv)]
    assert max(n_changed) <= 2 and sum(n_changed) > 0
    for t, a in zip(texts, adv):
        for old, new in changed_words(t, a):
            assert old.lower() not in protected and old.lower() not in STOP_WORDS
            assert new.lower() not in protected and new.lower() not in STOP_WORDS
        assert a.endswith(".")
    # never a class name nor a near-synonym of one among the candidates
    hood = attack.neighbourhood("a photo of a t-shirt.", classnames)
    offered = {Words(h).cores[1] for h in hood}
    assert offered and not offered & {"shirt", "shirts", "t-shirts", "jacket", "pants", "trousers", "poster"}


def test_char_budget_and_protection(zero_shot):
    make, _, classnames = zero_shot
    objective, texts = make("a photo of a {c}.")
    protected = protected_words(classnames)
    adv = create_attack("char", char_budget=2, max_candidates=40).perturb(texts, objective, protected=classnames)
    assert sum(a != t for a, t in zip(adv, texts)) > 0
    for t, a in zip(texts, adv):
        pairs = changed_words(t, a)
        assert sum(levenshtein(x, y) for x, y in pairs) <= 2
        for old, new in pairs:
            assert old.lower() not in STOP_WORDS and old.lower() not in protected  # class names kept
            assert new.lower() not in protected
    char = create_attack("char", max_candidates=None)
    hood = char.neighbourhood("a photo of a coat.", classnames)
    assert "a phoo of a coat." in hood and "a photos of a coat." in hood
    assert all([Words(h).cores[i] for i in (0, 2, 3, 4)] == ["a", "of", "a", "coat"] for h in hood)
    assert "a photo of a boat." in char.neighbourhood("a photo of a coat.", [])
    assert "a phono of a coat." not in char.neighbourhood("a photo of a coat.", ["coat", "phono"])


# --- effect: lowers accuracy, matches exhaustive search --------------------------------------


def test_word_attack_lowers_zero_shot_accuracy(zero_shot, fmnist):
    """Per-sample threat model, on the dataset's own template (the one the model was trained on:
    four editable words once stop words and class names are protected), and on a template the
    model never saw. ("a photo of a {c}." would leave ONE editable word: there the threat model is
    narrow, not the search; the exhaustive-search test below covers it.)"""
    make, _, classnames = zero_shot
    objective, texts = make(fmnist[0].templates[0])
    clean = 1 - fooled_rate(objective, texts)
    adv = create_attack("word", word_budget=1, k=10).perturb(texts, objective, protected=classnames)
    robust = 1 - fooled_rate(objective, adv)
    assert clean >= 0.6
    assert robust <= clean - 0.1, (clean, robust)

    objective, texts = make("a blurry photo of the small {c}.")
    clean = 1 - fooled_rate(objective, texts)
    robust = 1 - fooled_rate(objective, create_attack("word").perturb(texts, objective, protected=classnames))
    assert robust <= 0.5 * clean, (clean, robust)


@pytest.mark.parametrize("template", ["a photo of a {c}.", "a blurry photo of the small {c}."])
def test_greedy_reaches_exhaustive_search(zero_shot, template):
    make, _, classnames = zero_shot
    objective, texts = make(template)
    attack = create_attack("word", word_budget=1, k=10)
    counting = CountingObjective(objective)
    adv = attack.perturb(texts, counting, protected=classnames)
    greedy = fooled_rate(objective, adv)
    best = exhaustive_success(attack, objective, texts, classnames)
    assert greedy >= 0.95 * best, (greedy, best)
    n_pos = max(len([w for w in Words(t).cores if w.lower() not in STOP_WORDS]) for t in texts)
    assert len(counting.sizes) <= 1 + n_pos  # one call for importance + one per greedy round

    char = create_attack("char", char_budget=1, max_candidates=30)
    adv = char.perturb(texts, objective, protected=classnames)
    assert fooled_rate(objective, adv) >= 0.95 * exhaustive_success(char, objective, texts, classnames)


def test_batched_equals_one_at_a_time(zero_shot):
    make, _, classnames = zero_shot
    objective, texts = make("a blurry photo of the small {c}.")
    texts = texts[:6]
    attack = create_attack("word", word_budget=2, k=4)
    counting = CountingObjective(objective)
    batched = attack.perturb(texts, counting, protected=classnames)
    single = OneAtATime(objective)
    assert attack.perturb(texts, single, protected=classnames) == batched
    assert len(counting.sizes) == attack.stats.calls == 1 + attack.stats.rounds
    assert single.calls == sum(counting.sizes) > 5 * len(counting.sizes)


# --- the MMCoA training path -----------------------------------------------------------------


def test_embedding_kl_objective_through_word(trained_model, fmnist):
    from mmcoa.defenses import DefenseContext, create_defense

    train_set, _ = fmnist
    model = trained_model
    labels = train_set.labels[:32]
    ctx = DefenseContext(train_set.classnames, same_class_targets=True)
    captions = ctx.captions(labels)
    with torch.no_grad():
        clean = model.encode_text(model.tokenize(captions), normalize=False)
    objective = EmbeddingKLObjective(model, clean)
    attack = create_attack("word", word_budget=1, candidates="glove", k=10, cos_threshold=0.5, mlm_name="bert-base-uncased")
    adv = attack.perturb(captions, objective)
    changed = [changed_words(c, a) for c, a in zip(captions, adv)]
    assert all(len(c) <= 1 for c in changed) and all(changed)
    kl = objective(adv, torch.arange(len(adv))).loss
    assert (kl > 0).all()

    defense = create_defense("mmcoa", model, ctx)
    out = defense.loss(model, train_set.float_images(slice(0, 16)), train_set.labels[:16])
    assert torch.isfinite(out.loss) and out.logs["text_changed"] > 0


# --- the masked-LM path, offline -------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "of", "the", ".", "photo", "picture", "tiger",
         "shark", "lion", "whale", "cat", "dog", "big", "##fin", "##tail", "##s", "fish", "bird"]
# what the crafted model predicts at a position holding each token
PARTNER = {"[CLS]": "dog", "tiger": "lion", "shark": "whale", "##fin": "##tail", "photo": "picture", "big": "bird",
           "lion": "cat", "whale": "fish", "fish": "bird"}


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A tiny random BertForMaskedLM whose prediction at a position depends only on the token there.

    Attention and feed-forward outputs are zeroed (each layer passes its input through LayerNorm) and
    position embeddings are zero, so the hidden state at index p is a function of token p alone; the
    decoder rows are set so that token t predicts PARTNER[t]. Reading the wrong index (the authors'
    [CLS] off-by-one) would then give the partner of the previous token.
    """
    import inspect

    import transformers
    from transformers import BertConfig, BertForMaskedLM

    # transformers 5: BertTokenizer is the fast (Rust) one, BertTokenizerLegacy the Python one;
    # transformers 4: BertTokenizerFast and BertTokenizer.
    fast_cls = getattr(transformers, "BertTokenizerFast", None) or transformers.BertTokenizer
    slow_cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer

    def build(cls, path):
        arg = "vocab" if "vocab" in inspect.signature(cls.__init__).parameters else "vocab_file"
        return cls(**{arg: str(path)})

    root = tmp_path_factory.mktemp("tiny_mlm")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, tie_word_embeddings=False)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.zero_()
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        for layer in model.bert.encoder.layer:
            for lin in (layer.attention.output.dense, layer.output.dense):
                lin.weight.zero_()
                lin.bias.zero_()
        ids = torch.arange(len(VOCAB)).view(-1, 1)
        z = model.cls.predictions.transform(model.bert(input_ids=ids).last_hidden_state[:, 0])
        z = torch.nn.functional.normalize(z, dim=-1)
        dec = model.cls.predictions.decoder
        dec.weight.copy_(0.01 * torch.randn_like(dec.weight))
        dec.bias.zero_()
        for src, dst in PARTNER.items():
            dec.weight[VOCAB.index(dst)] += 20 * z[VOCAB.index(src)]
    model.save_pretrained(root)
    fast, slow = build(fast_cls, root / "vocab.txt"), build(slow_cls, root / "vocab.txt")
    assert fast.is_fast and not slow.is_fast and fast.tokenize("sharkfin") == ["shark", "##fin"]
    fast.save_pretrained(root)
    return root, model, slow, fast


@pytest.mark.parametrize("which", ["slow", "fast"])
def test_mlm_candidates_read_the_right_position(tiny_mlm, which):
    _, model, slow, fast = tiny_mlm
    src = MaskedLMCandidates(model=model, tokenizer=slow if which == "slow" else fast)
    ids, spans = src.encode(("tiger", "sharkfin", "photo"))
    assert ids[0] == VOCAB.index("[CLS]") and [e - s for s, e in spans] == [1, 2, 1] and spans[0][0] == 1
    words = ("tiger", "shark", "sharkfin", "photo")
    accept = lambda orig, cand: cand != orig  # noqa: E731
    got = src.propose([(words, j) for j in range(4)], 3, accept)
    assert got[0][0] == "lion" and "dog" not in got[0]  # not the [CLS] prediction
    assert got[1][0] == "whale" and "lion" not in got[1]  # not the previous word's prediction
    assert got[2][0] == "whaletail"  # combination of the top sub-word predictions
    assert got[3][0] == "picture"
    assert all(not c.startswith("##") and "[" not in c for cands in got for c in cands)


def test_mlm_word_attack_end_to_end(tiny_mlm):
    root, *_ = tiny_mlm
    attack = create_attack("word", candidates="mlm", mlm_name=str(root), word_budget=1, k=2)
    texts = ["The tiger shark.", "the big sharkfin", "a photo of the tiger"]
    adv = attack.perturb(texts, WordLikes(["whale", "whaletail", "cat"]))
    assert adv[0] == "The tiger whale."
    assert adv[1] == "the big whaletail"
    assert len(changed_words(texts[2], adv[2])) == 1
    # protected words are neither edited nor offered; BERT-Attack's [UNK] never appears
    adv = attack.perturb(["The tiger shark."], WordLikes(["whale"]), protected=["whale", "tiger"])
    assert "whale" not in adv[0] and "tiger" in adv[0] and "[UNK]" not in adv[0]
