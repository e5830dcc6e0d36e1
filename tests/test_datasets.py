"""The dataset registry and the streaming loader, on files written here in the real on-disk formats."""

from __future__ import annotations

import csv
import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mmcoa.data import (
    DataError,
    ImageDataset,
    dataset_spec,
    is_dataset,
    list_datasets,
    load_prepared,
    make_loader,
    manifest,
    open_dataset,
    prepare,
    register_dataset,
)

RNG = np.random.default_rng(0)


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder tree: RGB PNGs, one greyscale, RGBA, CMYK and palette file, a garbage and a truncated JPEG.

    Returns (root, {kind: path}). Class folders: ``cat`` and ``chat_noir_été`` (non-ASCII, underscore).
    """
    base = tmp_path_factory.mktemp("folder") / "pets_tree"
    files = {}
    for split in ("train", "test"):
        for cls in ("cat", "chat_noir_été"):
            d = base / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(_rgb(12, 12)).save(d / f"rgb{i}.png")
    odd = base / "test" / "cat"
    Image.fromarray(RNG.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(odd / "gray.png")
    Image.fromarray(RNG.integers(0, 256, (12, 12, 4), dtype=np.uint8), "RGBA").save(odd / "rgba.png")
    Image.fromarray(_rgb(12, 12)).convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    Image.fromarray(_rgb(12, 12)).convert("P").save(odd / "palette.png")
    (odd / "garbage.jpg").write_bytes(b"this is not an image")
    buf = odd / "whole.jpg"
    Image.fromarray(_rgb(40, 40)).save(buf, quality=90)
    (odd / "truncated.jpg").write_bytes(buf.read_bytes()[:300])
    buf.unlink()
    Image.fromarray(_rgb(20, 30)).save(base / "test" / "chat_noir_été" / "wide.png")  # another size
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "palette.png", "garbage.jpg", "truncated.jpg"):
        files[name.split(".")[0]] = odd / name
    files["wide"] = base / "test" / "chat_noir_été" / "wide.png"
    return base, files


def _index(ds, path) -> int:
    return ds.paths.index(str(path))


def test_folder_modes_become_rgb_and_names_are_clean(folder):
    base, files = folder
    ds = open_dataset(f"folder:{base}", "test")
    assert isinstance(ds, ImageDataset) and ds.classnames == ["cat", "chat noir été"]
    assert len(ds) == len(ds.targets) == 3 + 6 + 3 + 1
    gray, _ = ds[_index(ds, files["gray"])]
    with Image.open(files["gray"]) as im:
        g = torch.from_numpy(np.array(im))
    assert gray.shape == (3, 12, 12) and all(torch.equal(gray[c], g) for c in range(3))
    rgba, label = ds[_index(ds, files["rgba"])]
    with Image.open(files["rgba"]) as im:
        assert torch.equal(rgba, torch.from_numpy(np.array(im)[..., :3]).permute(2, 0, 1)) and label == 0
    cmyk, _ = ds[_index(ds, files["cmyk"])]
    with Image.open(files["cmyk"]) as im:  # PIL's own colour conversion is the oracle
        assert im.mode == "CMYK" and torch.equal(cmyk, torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    pal, _ = ds[_index(ds, files["palette"])]
    with Image.open(files["palette"]) as im:
        assert im.mode == "P" and torch.equal(pal, torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    with pytest.raises(DataError, match="garbage.jpg"):
        ds[_index(ds, files["garbage"])]
    assert ds.describe(_index(ds, files["wide"])) == str(files["wide"])


def test_loader_skip_counts_and_fail_names_the_file(folder):
    base, files = folder
    ds = open_dataset(f"folder:{base}", "test", on_corrupt="skip")
    order = list(range(len(ds)))[::-1]
    batches = [order[k : k + 5] for k in range(0, len(order), 5)]
    loader = make_loader(ds, batches, size=8, num_workers=1)
    seen = torch.cat([idx for _, _, idx in loader])
    broken = {_index(ds, files["garbage"]), _index(ds, files["truncated"])}
    assert seen.tolist() == [i for i in order if i not in broken]
    assert loader.skipped == 2 and set(loader.stats.skipped_files) == {str(files["garbage"]), str(files["truncated"])}
    strict = open_dataset(f"folder:{base}", "test", on_corrupt="fail")
    with pytest.raises(DataError, match="garbage.jpg|truncated.jpg"):
        list(make_loader(strict, batches, size=8))


def test_loader_native_needs_one_size_and_resize_matches_clip_preprocessing(folder):
    base, files = folder
    ds = open_dataset(f"folder:{base}", "train")
    images, labels, idx = next(iter(make_loader(ds, [[0, 4, 2]])))
    assert images.dtype == torch.float32 and images.shape == (3, 3, 12, 12)
    assert torch.equal(images, torch.stack([ds[i][0] for i in (0, 4, 2)]).float() / 255)
    assert labels.tolist() == [int(ds.targets[i]) for i in (0, 4, 2)] and idx.tolist() == [0, 4, 2]
    test = open_dataset(f"folder:{base}", "test")
    mixed = [_index(test, files["wide"]), 0]
    with pytest.raises(DataError, match=r"cat/\S+: image of size 12x12, but \S+wide\.png in the same batch is 20x30; set a size"):
        list(make_loader(test, [mixed]))
    # Resized: shortest side to 16, bicubic, antialiased, centre crop -- against torchvision's PIL pipeline.
    from torchvision import transforms as T

    clip_pre = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16), T.PILToTensor()])
    out, _, _ = next(iter(make_loader(test, [mixed], size=16)))
    with Image.open(files["wide"]) as im:
        want = clip_pre(im.convert("RGB")).float() / 255
    assert out.shape == (2, 3, 16, 16)
    assert (out[0] - want).abs().mean() < 0.02 and (out[0] - want).abs().max() < 0.2


def _write_csv(path, rows, header):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_csv_text_labels_splits_and_int_labels_with_names(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(_rgb(10, 10)).save(img_dir / f"{i}.png")
        rows.append([f"imgs/{i}.png", ["猫", "hund", "ёж"][i % 3], "test" if i < 3 else "train"])
    _write_csv(tmp_path / "set.csv", rows, ["path", "label", "split"])
    name = f"csv:{tmp_path / 'set.csv'}"
    assert is_dataset(name)
    train, test = open_dataset(name, "train"), open_dataset(name, "test")
    assert train.classnames == test.classnames == sorted(["猫", "hund", "ёж"])
    assert len(train) == 9 and len(test) == 3
    assert [train.classnames[y] for y in test.targets] == ["猫", "hund", "ёж"]
    img, _ = test[1]
    assert torch.equal(img, torch.from_numpy(np.array(Image.open(img_dir / "1.png"))).permute(2, 0, 1))
    # Integer labels named by a classname column, no split column: a seeded stratified 70/30 split.
    int_rows = [[f"imgs/{i % 12}.png", i % 2, ["zero", "one"][i % 2]] for i in range(40)]
    _write_csv(tmp_path / "ints.csv", int_rows, ["path", "label", "classname"])
    a, b = open_dataset(f"csv:{tmp_path / 'ints.csv'}", "train"), open_dataset(f"csv:{tmp_path / 'ints.csv'}", "test")
    assert a.classnames == ["zero", "one"] and len(a) + len(b) == 40 and len(b) == 12
    assert np.bincount(b.targets).tolist() == [6, 6]
    _write_csv(tmp_path / "bad.csv", [["imgs/0.png", "x"]], ["file", "label"])
    with pytest.raises(DataError, match="missing column.*path"):
        open_dataset(f"csv:{tmp_path / 'bad.csv'}", "train")


def test_imagenet_wnid_subset_maps_to_clean_names(tmp_path):
    """ImageNet class 0 is n01440764 'tench', class 217 n02102040 'English springer' (the standard index)."""
    for split in ("train", "val"):
        for wnid in ("n02102040", "n01440764"):
            d = tmp_path / "imagenet" / split / wnid
            d.mkdir(parents=True)
            Image.fromarray(_rgb(9, 9)).save(d / f"{wnid}_1.JPEG")
    ds = open_dataset("imagenet", "test", root=tmp_path)
    assert ds.wnids == ["n01440764", "n02102040"]
    assert ds.classnames[0] == "tench" and "springer" in ds.classnames[1].lower()
    assert [ds.wnids[y] for y in ds.targets] == [p.split("/")[-2] for p in ds.paths]


def test_digits_split_is_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    full = load_digits()
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.3) < 0.01
    assert np.array_equal(np.bincount(train.targets) + np.bincount(test.targets), np.bincount(full.target))
    ratio = np.bincount(test.targets) / np.bincount(full.target)
    assert np.all(np.abs(ratio - 0.3) < 0.02)
    want = sorted(np.rint(full.images * 255 / 16).astype(np.uint8).reshape(1797, -1).tobytes()[k * 64 : (k + 1) * 64] for k in range(1797))
    got = sorted(ds.image(i).numpy().tobytes() for ds in (train, test) for i in range(len(ds)))
    assert got == want and train.image(0).shape == (1, 8, 8)
    assert train.classnames == [str(i) for i in range(10)] and "{c}" in train.templates[0]
    assert open_dataset("digits", "test").targets.tolist() == test.targets.tolist()  # deterministic


def _idx(path, array: np.ndarray, magic: int):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_stream_as_one_channel(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = {s: RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 20), ("t10k", 10))}
    labels = {s: np.arange(len(a)) % 10 for s, a in images.items()}
    for s in images:
        _idx(raw / f"{s}-images-idx3-ubyte", images[s], 2051)
        _idx(raw / f"{s}-labels-idx1-ubyte", labels[s], 2049)
    ds = open_dataset("fashion_mnist", "test", root=tmp_path)
    assert len(ds) == 10 and ds.targets.tolist() == labels["t10k"].tolist()
    assert torch.equal(ds[3][0], torch.from_numpy(images["t10k"][3]).unsqueeze(0))
    assert ds.classnames[0] == "t-shirt" and len(ds.classnames) == dataset_spec("fashion_mnist").num_classes


DTD_CLASSES = (
    "banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous flecked "
    "freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted meshed paisley "
    "perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled stained stratified striped "
    "studded swirly veined waffled woven wrinkled zigzagged"
).split()
EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]


def test_torchvision_layouts_offline(tmp_path):
    """Pets, DTD and EuroSAT in torchvision's layouts (these loaders check folders, not checksums)."""
    pets = tmp_path / "oxford-iiit-pet"
    (pets / "images").mkdir(parents=True)
    (pets / "annotations").mkdir()
    for split, ids in (("trainval", ["Abyssinian_1", "american_bulldog_2"]), ("test", ["american_bulldog_3", "Abyssinian_4"])):
        lines = []
        for image_id in ids:
            Image.fromarray(_rgb(14, 11)).save(pets / "images" / f"{image_id}.jpg")
            breed = 1 if image_id.startswith("Abyssinian") else 2
            lines.append(f"{image_id} {breed} {1 if breed == 1 else 2} 1")
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    ds = open_dataset("pets", "test", root=tmp_path)
    assert [ds.classnames[y].lower().replace(" ", "_") for y in ds.targets] == ["american_bulldog", "abyssinian"]
    assert ds.describe(0).endswith("american_bulldog_3.jpg") and ds[0][0].shape == (3, 14, 11)
    assert ds.paper_template == "A photo of a {c}, a type of pet." and ds.templates

    dtd = tmp_path / "dtd" / "dtd"
    (dtd / "labels").mkdir(parents=True)
    for cls in DTD_CLASSES:
        (dtd / "images" / cls).mkdir(parents=True)
        Image.fromarray(_rgb(8, 8)).save(dtd / "images" / cls / f"{cls}_0001.jpg")
    (dtd / "labels" / "test1.txt").write_text("".join(f"{c}/{c}_0001.jpg\n" for c in DTD_CLASSES))
    (dtd / "labels" / "train1.txt").write_text("".join(f"{c}/{c}_0001.jpg\n" for c in DTD_CLASSES))
    tex = open_dataset("dtd", "test", root=tmp_path)
    assert len(tex.classnames) == 47 and [tex.classnames[y] for y in tex.targets] == DTD_CLASSES

    for cls in EUROSAT:
        d = tmp_path / "eurosat" / "2750" / cls
        d.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(_rgb(8, 8)).save(d / f"{cls}_{i}.jpg")
    tr, te = open_dataset("eurosat", "train", root=tmp_path), open_dataset("eurosat", "test", root=tmp_path)
    te_files = [te.describe(i) for i in range(len(te))]
    assert len(tr) == 70 and len(te) == 30 and not {tr.describe(i) for i in range(len(tr))} & set(te_files)
    names = {p.split("/")[-2]: te.classnames[y] for p, y in zip(te_files, te.targets)}
    assert names["Forest"] == "forest" and names["SeaLake"] == "lake or sea" and names["Highway"] == "highway or road"


def test_registry_class_counts_and_names():
    for name in list_datasets():
        spec = dataset_spec(name)
        if spec.classnames is not None and spec.num_classes is not None:
            assert len(spec.classnames) == spec.num_classes, name
    assert len(dataset_spec("imagenet").classnames) == 1000
    assert {"cifar10", "cifar100", "stl10", "imagenet", "caltech101", "caltech256", "pets", "flowers", "fgvc_aircraft",
            "cars", "sun397", "food101", "eurosat", "dtd", "pcam", "country211", "fashion_mnist", "digits"} <= set(list_datasets())
    assert is_dataset("folder:/any/where") and is_dataset("csv:x.csv") and not is_dataset("folder:") and not is_dataset("cifar11")
    with pytest.raises(DataError, match="unknown dataset 'cifar11'.*cifar10.*folder:PATH"):
        open_dataset("cifar11", "test")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda: None)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DataError, match=rf"pets: not found in {tmp_path}/oxford-iiit-pet; set download: true"):
        open_dataset("pets", "test", root=tmp_path)
    with pytest.raises(DataError, match="imagenet: not found .*WordNet id"):
        open_dataset("imagenet", "train", root=tmp_path)
    with pytest.raises(DataError, match="no split 'val'"):
        open_dataset("digits", "val")


def test_manifest_hashes_what_is_used(folder, tmp_path):
    base, _ = folder
    ds = open_dataset(f"folder:{base}", "train")
    m = manifest(ds, [0, 3])
    sha = hashlib.sha256("\n".join(ds.classnames).encode())
    for i in (0, 3):
        sha.update(f"\n{int(ds.targets[i])}:".encode() + open(ds.paths[i], "rb").read())
    assert m["sha256"] == sha.hexdigest() and m["files"] == ["cat/rgb0.png", "chat_noir_été/rgb0.png"]
    assert m["dataset"] == "folder_pets_tree" and m["split"] == "train" and m["indices"] == [0, 3]
    json.dumps(m)
    assert manifest(ds, [0, 1])["sha256"] != m["sha256"]
    digits = open_dataset("digits", "test")
    assert manifest(digits, [5, 6])["sha256"] == manifest(open_dataset("digits", "test"), [5, 6])["sha256"]
    assert "files" not in manifest(digits, [5])


def test_prepared_dataset_is_an_image_dataset(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "t" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(_rgb(10, 12)).save(tmp_path / "t" / split / cls / f"{i}.png")
    prepare(f"folder:{tmp_path / 't'}", tmp_path / "p", n_train=4, n_test=2, seed=0, image_size=8)
    train = load_prepared(tmp_path / "p", "train")
    assert isinstance(train, ImageDataset) and train.targets.dtype == np.int64
    images, labels, _ = next(iter(make_loader(train, [[0, 1, 2, 3]])))
    assert torch.equal(images, train.float_images()) and torch.equal(labels, train.labels)


def test_batched_resize_equals_one_by_one():
    from mmcoa.data.transforms import resize_batch, resize_image

    images = [torch.from_numpy(_rgb(h, w)).permute(2, 0, 1).contiguous() for h, w in ((20, 30), (20, 30), (9, 9), (20, 30))]
    for mode in ("shortest", "squash", "longest"):
        batch = resize_batch(images, 12, "bicubic", mode)
        assert torch.equal(batch, torch.stack([resize_image(i, 12, "bicubic", mode) for i in images])), mode


def test_pcam_hdf5_streams_through_torchvision(tmp_path):
    """PCAM's HDF5 files (x: [N, 96, 96, 3] uint8, y: [N, 1, 1, 1]) in torchvision's layout."""
    import h5py

    (tmp_path / "pcam").mkdir()
    x = RNG.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], dtype=np.uint8).reshape(5, 1, 1, 1)
    with h5py.File(tmp_path / "pcam" / "camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "pcam" / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f["y"] = y
    ds = open_dataset("pcam", "test", root=tmp_path)
    assert ds.targets.tolist() == [0, 1, 1, 0, 1] and len(ds.classnames) == 2
    assert torch.equal(ds[2][0], torch.from_numpy(x[2]).permute(2, 0, 1))
    images, labels, _ = next(iter(make_loader(ds, [[4, 0]], size=32)))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 0]


def test_datasets_command_lists_presence_and_how_to_obtain(tmp_path):
    import typer
    from typer.testing import CliRunner

    from stages.datasets import datasets

    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    app = typer.Typer()
    app.command()(datasets)
    result = CliRunner().invoke(app, ["--root", str(tmp_path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert set(list_datasets()) <= set(rows)
    assert "yes" in rows["digits"] and "yes" in rows["imagenet"] and "no" in rows["cifar10"]
    assert "download: true" in rows["cifar10"] and str(tmp_path / "cifar-10-batches-py") in rows["cifar10"]


def test_caltech_layouts_map_folders_to_names(tmp_path):
    """Caltech-101's first real folders (background excluded by torchvision) and Caltech-256's numbered ones."""
    first = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion"]
    for cls in first:
        d = tmp_path / "caltech101" / "101_ObjectCategories" / cls
        d.mkdir(parents=True)
        for i in range(1, 5):
            Image.fromarray(RNG.integers(0, 256, (9, 7), dtype=np.uint8), "L").save(d / f"image_{i:04d}.jpg")
    tr, te = open_dataset("caltech101", "train", root=tmp_path), open_dataset("caltech101", "test", root=tmp_path)
    assert len(tr) + len(te) == 20 and len(tr.classnames) == 101
    got = {te.describe(i).split("/")[-2]: te.classnames[y] for i, y in enumerate(te.targets)}
    want = {"Faces": "off-center face", "Faces_easy": "centered face", "Leopards": "leopard", "Motorbikes": "motorbike", "accordion": "accordion"}
    assert got == {k: want[k] for k in got} and len(got) >= 4
    assert te[0][0].shape == (3, 9, 7)  # greyscale JPEGs come out RGB

    for k in range(1, 258):
        (tmp_path / "caltech256" / "256_ObjectCategories" / f"{k:03d}.c{k}").mkdir(parents=True)
    named = {1: "001.ak47", 253: "253.faces-easy-101"}
    for k, folder in named.items():
        d = tmp_path / "caltech256" / "256_ObjectCategories" / folder
        (tmp_path / "caltech256" / "256_ObjectCategories" / f"{k:03d}.c{k}").rmdir()
        d.mkdir()
        for i in range(1, 4):
            Image.fromarray(_rgb(6, 6)).save(d / f"{k:03d}_{i:04d}.jpg")
    c256 = open_dataset("caltech256", "train", root=tmp_path)
    assert len(c256.classnames) == 257 and c256.classnames[0] == "ak47" and c256.classnames[252] == "faces easy"
    assert {c256.describe(i).split("/")[-2] for i in range(len(c256))} <= set(named.values())


def test_fast_decoder_matches_pil_bit_for_bit(tmp_path):
    """JPEG/PNG decode through torchvision.io, other formats through PIL: the pixels must be PIL's."""
    from mmcoa.data.decode import read_image_file

    cases = {
        "photo.jpg": Image.fromarray(_rgb(33, 17)),
        "photo.png": Image.fromarray(_rgb(5, 9)),
        "gray.jpg": Image.fromarray(RNG.integers(0, 256, (16, 16), dtype=np.uint8), "L"),
        "photo.bmp": Image.fromarray(_rgb(7, 7)),
        "anim.gif": Image.fromarray(_rgb(8, 8)).convert("P"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        with Image.open(tmp_path / name) as ref:
            want = torch.from_numpy(np.array(ref.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(read_image_file(tmp_path / name), want), name


# --- a subset that changed after it was written is refused on load --------------------------------


def _digits_subset(out, split="test", n=20):
    from mmcoa.data.subset import write_subset

    return write_subset(open_dataset("digits", split), n, 0, out, cache_max_images=1000, name="digits")


def _edit_cache(path):
    """Change one pixel of a subset's cached images, keeping a valid safetensors file."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    t["images"][0, 0, 0, 0] ^= 1
    save_file(t, str(path))


def _edit_manifest(path, **fields):
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta, indent=1))


def test_a_changed_subset_is_refused_on_load(tmp_path):
    from mmcoa.data.manifest import ContentMismatchError
    from mmcoa.data.subset import open_subset

    meta = _digits_subset(tmp_path / "ok")
    assert meta["cached"] and len(meta["cache_sha256"]) == len(meta["record_sha256"]) == 64
    dataset, kept = open_subset(tmp_path / "ok")
    assert kept == meta["indices"] and len(kept) == 20

    fix = "re-run `mmcoa fetch-eval digits --out "
    _digits_subset(tmp_path / "pixel")
    _edit_cache(tmp_path / "pixel" / "images.safetensors")
    with pytest.raises(ContentMismatchError, match=r"pixel/images\.safetensors: changed since it was written") as err:
        open_subset(tmp_path / "pixel")
    assert fix in str(err.value) and isinstance(err.value, DataError)

    for label, fields in {"indices": {"indices": meta["indices"][:-1] + [meta["indices"][-1] + 1]},
                          "classnames": {"classnames": ["x"] * 10}, "cache hash": {"cache_sha256": "0" * 64}}.items():
        _digits_subset(tmp_path / label)
        _edit_manifest(tmp_path / label / "manifest.json", **fields)
        with pytest.raises(ContentMismatchError, match=r"manifest\.json: changed since it was written") as err:
            open_subset(tmp_path / label)
        assert fix in str(err.value), label

    _digits_subset(tmp_path / "old")
    _edit_manifest(tmp_path / "old" / "manifest.json", record_sha256=None)
    with pytest.raises(ContentMismatchError, match="records no content hash"):
        open_subset(tmp_path / "old")
    _digits_subset(tmp_path / "gone")
    (tmp_path / "gone" / "images.safetensors").unlink()
    with pytest.raises(ContentMismatchError, match=r"images\.safetensors: missing"):
        open_subset(tmp_path / "gone")
    # the fine-tuning subset names its own command
    _digits_subset(tmp_path / "train", split="train")
    _edit_cache(tmp_path / "train" / "images.safetensors")
    with pytest.raises(ContentMismatchError, match=r"re-run `mmcoa fetch --out \S*train`"):
        open_subset(tmp_path / "train")


def test_a_changed_prepared_split_is_refused_on_load(tmp_path):
    from mmcoa.data.manifest import ContentMismatchError

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "t" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(_rgb(10, 12)).save(tmp_path / "t" / split / cls / f"{i}.png")
    prepare(f"folder:{tmp_path / 't'}", tmp_path / "p", n_train=4, n_test=2, seed=0, image_size=8)
    assert len(load_prepared(tmp_path / "p", "test")) == 2
    _edit_cache(tmp_path / "p" / "test.safetensors")
    with pytest.raises(ContentMismatchError, match=r"test\.safetensors: changed since it was written.*prepare"):
        load_prepared(tmp_path / "p", "test")
    assert len(load_prepared(tmp_path / "p", "train")) == 4


def test_cli_refuses_a_changed_subset_in_one_line_exit_2_writing_nothing(tmp_path):
    """`mmcoa evaluate` on an evaluation subset whose cached images were edited after `fetch-eval`
    (a changed manifest fails the same check earlier, before the model loads: see above)."""
    import os
    import subprocess
    import sys

    import yaml

    from mmcoa.models import create_model, save_model

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "threads": 1}))
    save_model(create_model("mmcoa-test-micro"), tmp_path / "micro")
    _digits_subset(tmp_path / "eval")
    _edit_cache(tmp_path / "eval" / "images.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    mmcoa = os.path.join(os.path.dirname(sys.executable), "mmcoa")
    done = subprocess.run(
        [mmcoa, "evaluate", "--name", "micro", "--model", str(tmp_path / "micro"), "--data", str(tmp_path / "eval"),
         "--out", str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, lines
    assert "eval/images.safetensors: changed since it was written" in lines[0], lines[0]
    assert f"re-run `mmcoa fetch-eval digits --out {tmp_path / 'eval'}`" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "micro", "params.yaml"]  # nothing written
