"""Retrieval: R@k against hand computation and a brute-force oracle, the four file formats written
here, their errors, the synthetic fmnist_pairs set, and evaluation under image, text and multimodal
attacks of a micro CLIP trained here for a few seconds on the synthetic pairs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmcoa.attacks import create_attack
from mmcoa.attacks.text import Words
from mmcoa.data.registry import DataError
from mmcoa.data.retrieval import RetrievalDataset, is_retrieval_dataset, open_retrieval
from mmcoa.data.synthetic import COMPOSITIONS, synthetic_pairs
from mmcoa.models import create_model
from mmcoa.retrieval import KS, evaluate_retrieval, gallery_indices, recall_at_k

MICRO = "mmcoa-test-micro"

# --- R@k -----------------------------------------------------------------------------------------


def oracle_recall(scores: np.ndarray, pos: np.ndarray, k: int) -> list[bool]:
    """Brute force: sort the gallery putting, among equal scores, negatives first (the strict rule);
    a hit when any positive is among the first k."""
    out = []
    for s, p in zip(scores, pos):
        order = sorted(range(len(s)), key=lambda g: (-s[g], bool(p[g])))
        out.append(bool(p[order[:k]].any()))
    return out


def test_recall_at_k_hand_computed():
    """3 images, 5 captions (c0, c1 of image 0; c2 of image 1; c3, c4 of image 2), with ties."""
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.9, 0.2, 0.2],  # image 0: best own caption 0.9 ties c2 (a negative) -> rank 2
            [0.5, 0.6, 0.4, 0.7, 0.1],  # image 1: own c2 = 0.4, three negatives above -> rank 4
            [0.0, 0.2, 0.2, 0.2, 0.8],  # image 2: own c4 = 0.8 is first
        ]
    )
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    pos = caption_image.view(1, -1) == torch.arange(3).view(-1, 1)
    i2t = {k: recall_at_k(scores, pos, k).tolist() for k in (1, 2, 3, 4)}
    assert i2t == {1: [False, False, True], 2: [True, False, True], 3: [True, False, True], 4: [True, True, True]}
    # Text -> image, by hand: c0 first; c1 (0.1) below 0.6 and 0.2 -> rank 3; c2 (0.4) below 0.9 ->
    # rank 2; c3 (0.2) ties image 0 and is below image 1 (0.7) -> rank 3; c4 first.
    t2i = {k: recall_at_k(scores.T, pos.T, k).tolist() for k in (1, 2, 3)}
    assert t2i == {
        1: [True, False, False, False, True],
        2: [True, False, True, False, True],
        3: [True, True, True, True, True],
    }


def test_recall_at_k_matches_oracle_on_random_ties():
    gen = np.random.default_rng(0)
    for _ in range(30):
        q, g = gen.integers(1, 8), gen.integers(1, 15)
        scores = gen.integers(0, 4, size=(q, g)).astype(np.float32)  # few values: many ties
        pos = gen.random((q, g)) < 0.3
        for k in (1, 2, 5, 10):
            got = recall_at_k(torch.from_numpy(scores), torch.from_numpy(pos), k).tolist()
            assert got == oracle_recall(scores, pos, k)


def test_constant_scores_score_no_free_hits():
    scores = torch.zeros(4, 20)
    pos = torch.eye(4, 20, dtype=torch.bool)
    assert not recall_at_k(scores, pos, 10).any()
    assert recall_at_k(scores, pos, 20).all()  # 19 negatives tie: the positive is 20th


# --- file formats ----------------------------------------------------------------------------------

CAPTIONS = [["a red square", "something red"], ["a green, bright square"], ["blue", "a blue one", "the blue thing"]]


def _write_images(folder, sizes=((6, 8), (6, 8), (6, 8))):
    """Three PNGs of distinct random content; returns their names and uint8 [3, H, W] pixels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(1)
    names, pixels = [], []
    for i, (h, w) in enumerate(sizes):
        arr = gen.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
        pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
    return names, pixels


def _karpathy(names, filepath=None, splits=("test", "train", "test"), sentences=None):
    images = []
    for i, (name, split) in enumerate(zip(names, splits)):
        entry = {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in (sentences or CAPTIONS)[i]]}
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
    images.append({"filename": "other.png", "split": "val", "sentences": [{"raw": "not read"}]})
    return {"images": images, "dataset": "test"}


def _check_gallery(ds: RetrievalDataset, pixels, which):
    assert len(ds) == len(which)
    assert ds.captions == [c for i in which for c in CAPTIONS[i]]
    assert ds.caption_image.tolist() == [n for n, i in enumerate(which) for _ in CAPTIONS[i]]
    for n, i in enumerate(which):
        img, idx = ds[n]
        assert idx == n and img.dtype == torch.uint8 and torch.equal(img, pixels[i])


def test_karpathy_json_read_by_the_registry(tmp_path):
    names, pixels = _write_images(tmp_path / "flickr30k-images")
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(_karpathy(names)))
    ds = open_retrieval("flickr30k", "test", root=tmp_path)
    assert ds.name == "flickr30k" and ds.split == "test" and ds.protected == set()
    _check_gallery(ds, pixels, [0, 2])
    _check_gallery(open_retrieval("flickr30k", "train", root=tmp_path), pixels, [1])

    coco = tmp_path / "coco"
    names, pixels = _write_images(coco / "val2014")
    (coco / "dataset_coco.json").write_text(json.dumps(_karpathy(names, filepath="val2014", splits=("test", "restval", "train"))))
    _check_gallery(open_retrieval("mscoco", "train+restval", root=coco), pixels, [1, 2])

    sub = open_retrieval("mscoco", "train+restval", root=coco).subset([1, 0])
    assert sub.captions == CAPTIONS[2] + CAPTIONS[1] and sub.caption_image.tolist() == [0, 0, 0, 1]
    assert sub.split == "train+restval" and torch.equal(sub[1][0], pixels[1])


def test_coco_albef_and_csv_formats(tmp_path):
    names, pixels = _write_images(tmp_path / "val2014")
    coco = {
        "images": [{"id": 30 + i, "file_name": n} for i, n in reversed(list(enumerate(names)))],
        "annotations": [{"image_id": 30 + i, "id": j, "caption": c} for i, caps in enumerate(CAPTIONS) for j, c in enumerate(caps)],
    }
    (tmp_path / "coco_test_karpathy.json").write_text(json.dumps(coco))
    name = f"retrieval-json:{tmp_path / 'coco_test_karpathy.json'}"
    assert is_retrieval_dataset(name) and not is_retrieval_dataset("retrieval-xml:x")
    _check_gallery(open_retrieval(name), pixels, [0, 1, 2])  # images by id, as torchvision orders them

    # ALBEF: a string or a list per entry; entries naming one image merge.
    albef = [{"image": f"val2014/{names[0]}", "caption": CAPTIONS[0]}, {"image": f"val2014/{names[1]}", "caption": CAPTIONS[1][0]},
             {"image": f"val2014/{names[2]}", "caption": CAPTIONS[2][:2]}, {"image": f"val2014/{names[2]}", "caption": CAPTIONS[2][2]}]
    (tmp_path / "flickr_test.json").write_text(json.dumps(albef))
    ds = open_retrieval(f"retrieval-json:{tmp_path / 'flickr_test.json'}")
    assert ds.name == "json_flickr_test"
    _check_gallery(ds, pixels, [0, 1, 2])

    # CSV, header skipped, unquoted commas kept in the caption, images under root.
    lines = ["image,caption"] + [f"{names[i]},{c}" for i, caps in enumerate(CAPTIONS) for c in caps]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    _check_gallery(open_retrieval(f"retrieval-csv:{tmp_path / 'pairs.csv'}", root=tmp_path / "val2014"), pixels, [0, 1, 2])


def _one_line_error(fn, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_format_errors(tmp_path):
    names, _ = _write_images(tmp_path / "flickr30k-images")
    bad = _karpathy(names)
    bad["images"][2]["filename"] = "missing.png"
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(bad))
    _one_line_error(lambda: open_retrieval("flickr30k", "test", root=tmp_path), r"images\[2\]: image 'missing.png' not found")

    bare = _karpathy(names, sentences=[CAPTIONS[0], [], CAPTIONS[2]], splits=("test",) * 3)
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(bare))
    _one_line_error(lambda: open_retrieval("flickr30k", "test", root=tmp_path), r"images\[1\]: image 'img1.png' has no caption")

    albef = tmp_path / "a.json"
    albef.write_text(json.dumps([{"image": f"flickr30k-images/{names[0]}", "caption": ["ok", "  "]}]))
    _one_line_error(lambda: open_retrieval(f"retrieval-json:{albef}"), r"entry 0: empty caption")

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    _one_line_error(lambda: open_retrieval(f"retrieval-json:{broken}"), r"broken.json: not readable JSON")

    empty = tmp_path / "nothing"
    msg = _one_line_error(lambda: open_retrieval("mscoco", "test", root=empty), re.escape(str(empty / "dataset_coco.json")))
    assert "Karpathy" in msg and "images.cocodataset.org" in msg
    _one_line_error(lambda: open_retrieval("flickr31k"), "unknown retrieval dataset 'flickr31k'.*flickr30k")


# --- the synthetic set ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fmnist_raw")


def test_fmnist_pairs_captions_match_exactly_one_image(fm_root):
    from torchvision.datasets import FashionMNIST

    from mmcoa.data.sources import FASHION_CLASSES

    ds = open_retrieval("fmnist_pairs", "test", root=fm_root)
    assert len(ds) >= 200 and len(ds) == len(COMPOSITIONS)
    assert len({s.composition for s in ds.images}) == len(ds)  # unique compositions
    owners: dict[str, set[int]] = {}
    for caption, i in zip(ds.captions, ds.caption_image.tolist()):
        owners.setdefault(caption, set()).add(i)
    assert all(len(o) == 1 for o in owners.values())

    # Every caption names its image's classes (as whole words), and every item is a real test image
    # of the class its composition names, placed where the layout says.
    fm = FashionMNIST(str(fm_root), train=False, download=False)
    label_of = {fm.data[j].numpy().tobytes(): set() for j in range(len(fm.data))}
    for j in range(len(fm.data)):
        label_of[fm.data[j].numpy().tobytes()].add(int(fm.targets[j]))
    for i, scene in enumerate(ds.images):
        comp = scene.composition
        classes = [comp.first] + ([comp.second] if comp.second is not None else [])
        for item, c in zip(scene.items, classes):
            assert c in label_of[item.numpy().tobytes()]
        for caption in (ds.captions[j] for j in (ds.caption_image == i).nonzero().flatten().tolist()):
            words = set(re.findall(r"[a-z-]+", caption.lower()))
            for c in classes:
                name = FASHION_CLASSES[c]
                assert name.split()[-1] in words or name.split()[-1] + "s" in words or name + "es" in words
        canvas = ds[i][0][0]
        if comp.layout == "horizontal":
            assert torch.equal(canvas[14:42, :28], scene.items[0]) and torch.equal(canvas[14:42, 28:], scene.items[1])
        elif comp.layout == "vertical":
            assert torch.equal(canvas[:28, 14:42], scene.items[0]) and torch.equal(canvas[28:, 14:42], scene.items[1])
    assert {"left", "right", "top", "bottom", "above", "below", "two", "single"} | set(FASHION_CLASSES) <= ds.protected
    train = open_retrieval("fmnist_pairs", "train", root=fm_root)
    counts = np.unique([COMPOSITIONS.index(s.composition) for s in train.images], return_counts=True)[1]
    assert train.split == "train" and len(counts) == len(COMPOSITIONS) and set(counts.tolist()) == {len(train) // len(COMPOSITIONS)}
    tokens = create_model(MICRO).tokenize(ds.captions)
    assert int((tokens != 0).sum(1).max()) < tokens.shape[1]  # no caption is cut by the context


# --- evaluation under attack ------------------------------------------------------------------------


def _train_on_pairs(model, data: RetrievalDataset, steps: int, batch: int = 96, seed: int = 0):
    """A few in-batch contrastive steps; each batch holds distinct compositions (no false negatives)."""
    images = torch.stack([data[i][0] for i in range(len(data))]).float().div_(255.0)
    captions = [[] for _ in range(len(data))]
    for c, i in zip(data.captions, data.caption_image.tolist()):
        captions[i].append(c)
    n, cycles = len(COMPOSITIONS), len(data) // len(COMPOSITIONS)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    target = torch.arange(batch)
    for step in range(steps):
        idx = (step % cycles) * n + torch.randperm(n, generator=gen)[:batch]
        texts = [captions[i][int(torch.randint(len(captions[i]), (1,), generator=gen))] for i in idx.tolist()]
        logits = model.logit_scale * model.encode_image(images[idx]) @ model.encode_texts(texts).T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


EPS_255 = 4
PGD = {"eps_255": EPS_255, "step_255": 1, "steps": 5}


@pytest.fixture(scope="module")
def attacked(fm_root):
    torch.manual_seed(0)
    model = _train_on_pairs(create_model(MICRO), synthetic_pairs("train", 4 * len(COMPOSITIONS), seed=0, root=fm_root), steps=120)
    test = open_retrieval("fmnist_pairs", "test", root=fm_root)
    suite = [
        ("pgd", create_attack("pgd", seed=0, **PGD)),
        ("word", create_attack("word", word_budget=1)),
        ("co", create_attack("multimodal", mode="co_attack", image={"attack": "pgd", "params": PGD}, text={"attack": "word"})),
        ("indep", create_attack("multimodal", mode="independent", image={"attack": "pgd", "params": PGD}, text={"attack": "word"})),
    ]
    n = 96
    result = evaluate_retrieval(model, test, suite, n_images=n, batch_size=48, seed=0, n_examples=n)
    return model, test, result


def _mean(result, name, direction):
    return np.mean([result.metrics[f"fmnist_pairs.{name}.{direction}_r{k}"] for k in KS])


def test_clean_metrics_match_the_oracle(attacked):
    model, test, result = attacked
    gallery = test.subset(result.image_indices)
    assert result.n_images == len(gallery) == 96 and result.n_captions == gallery.n_captions
    assert torch.equal(result.image_indices, gallery_indices(len(test), 96, 0))
    with torch.no_grad():
        img = model.encode_image(torch.stack([gallery[i][0] for i in range(len(gallery))]).float() / 255)
        txt = model.encode_texts(gallery.captions)
    scores = (img @ txt.T).numpy()
    pos = (gallery.caption_image.view(1, -1) == torch.arange(len(gallery)).view(-1, 1)).numpy()
    for k in KS:
        i2t, t2i = oracle_recall(scores, pos, k), oracle_recall(scores.T, pos.T, k)
        assert result.outcomes["clean"][f"i2t_r{k}"].tolist() == i2t
        assert result.outcomes["clean"][f"t2i_r{k}"].tolist() == t2i
        assert result.metrics[f"fmnist_pairs.clean.i2t_r{k}"] == pytest.approx(np.mean(i2t), abs=1e-6)
    for name in ("clean", "pgd", "word", "co", "indep"):
        assert [len(result.outcomes[name][f"{d}_r1"]) for d in ("i2t", "t2i")] == [96, gallery.n_captions]
    # The model learned something: clean R@10 well above chance (about 10/96 for a caption).
    assert result.metrics["fmnist_pairs.clean.t2i_r10"] > 0.3


def _words_changed(clean: str, adv: str, protected: set[str]) -> int:
    a, b = Words(clean).cores, Words(adv).cores
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x.lower() in protected:
            assert x == y, f"protected word '{x}' edited in '{clean}' -> '{adv}'"
    return sum(x != y for x, y in zip(a, b))


def test_image_attack_keeps_budget_and_lowers_recall(attacked):
    _, _, result = attacked
    ex = result.examples["pgd"]
    assert len(ex["adversarial_images"]) == result.n_images
    assert (ex["adversarial_images"] - ex["images"]).abs().max() <= EPS_255 / 255 + 1e-6
    assert _mean(result, "pgd", "i2t") < _mean(result, "clean", "i2t") - 0.05
    assert _mean(result, "pgd", "t2i") < _mean(result, "clean", "t2i")
    assert result.threat_models["pgd"]["eps_255"] == EPS_255


def test_text_attack_keeps_budget_and_protected_words(attacked):
    _, test, result = attacked
    clean = test.subset(result.image_indices).captions
    adv = result.captions["word"]
    changed = torch.tensor([_words_changed(c, a, test.protected) for c, a in zip(clean, adv)])
    # The captions kept are the R@1 run's: those already out of the top 1 are left as they are.
    hit = result.outcomes["clean"]["t2i_r1"]
    assert changed.max() <= 1 and not changed[~hit].any() and changed[hit].sum() > hit.sum() // 2
    assert _mean(result, "word", "t2i") < _mean(result, "clean", "t2i")


def test_multimodal_attacks_keep_both_budgets_and_lower_recall(attacked):
    _, test, result = attacked
    clean = test.subset(result.image_indices).captions
    for name in ("co", "indep"):
        ex = result.examples[name]
        assert (ex["adversarial_images"] - ex["images"]).abs().max() <= EPS_255 / 255 + 1e-6
        assert max(_words_changed(c, a, test.protected) for c, a in zip(clean, result.captions[name])) <= 1
        for d in ("i2t", "t2i"):
            assert _mean(result, name, d) < _mean(result, "clean", d)
    # Independent attacks start both sides from clean inputs: its captions are the text attack's.
    assert result.captions["indep"] == result.captions["word"]


def test_load_time_resize_and_mixed_sizes(tmp_path):
    names, _ = _write_images(tmp_path / "flickr30k-images", sizes=((6, 8), (10, 7), (6, 8)))
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(_karpathy(names, splits=("test",) * 3)))
    ds = open_retrieval("flickr30k", "test", root=tmp_path)
    model = create_model(MICRO)
    _one_line_error(lambda: evaluate_retrieval(model, ds, [], n_images=3, batch_size=3, seed=0), "differ in size.*pass a size")
    bad = dict(n_images=3, batch_size=3, seed=0, size=16, interpolation="cubic")
    _one_line_error(lambda: evaluate_retrieval(model, ds, [], **bad), "interpolation")
    result = evaluate_retrieval(model, ds, [], n_images=2, batch_size=3, seed=0, size=16, n_examples=0)
    assert result.n_images == 2 and set(result.metrics) == {f"flickr30k.clean.{d}_r{k}" for d in ("i2t", "t2i") for k in KS}
    assert not torch.equal(gallery_indices(50, 10, 0), gallery_indices(50, 10, 1))
