import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import write_idx
from hashsearch.encoders import sources
from hashsearch.encoders.images import ImageRejected
from hashsearch.encoders.sources import FASHION_MNIST_CLASSES, open_source
from hashsearch.errors import HashsearchError


def _img(path, color=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), color).save(path, fmt)
    return path


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "photos"
    _img(root / "cats" / "a.jpg")
    _img(root / "cats" / "nested" / "deeper" / "b.PNG", fmt="PNG")
    _img(root / "dogs" / "Ünï códe.JPEG", fmt="JPEG")
    _img(root / "top.png")
    _img(root / ".hidden" / "x.jpg")
    _img(root / "dogs" / ".secret.jpg", fmt="JPEG")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


def _idx_dir(root, gz=True, n_train=12, n_test=5):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return root


def test_directory_classes_order_and_filters(image_dir):
    src = open_source(str(image_dir))
    rel = [os.path.relpath(src.path(i), image_dir) for i in range(len(src))]
    # sorted by path components, so a folder's contents stay together
    assert rel == ["cats/a.jpg", "cats/nested/deeper/b.PNG", "dogs/Ünï códe.JPEG", "top.png"]
    assert src.class_names == ["cats", "dogs"]
    assert {r: src.label(i) for i, r in enumerate(rel)} == {
        "top.png": -1, "cats/a.jpg": 0, "cats/nested/deeper/b.PNG": 0, "dogs/Ünï códe.JPEG": 1}
    assert src.labels().dtype == np.int64 and list(src.labels()) == [src.label(i) for i in range(len(src))]
    assert all(src.load(i).mode == "RGB" for i in range(len(src)))
    assert src.spec == str(image_dir) and os.path.isabs(src.spec)


def test_directory_without_class_folders(tmp_path):
    for name in ("b.jpg", "a.png"):
        _img(tmp_path / name)
    src = open_source(str(tmp_path))
    assert src.class_names == [] and list(src.labels()) == [-1, -1]
    assert [os.path.basename(src.path(i)) for i in range(2)] == ["a.png", "b.jpg"]


def test_list_files_txt_and_csv(tmp_path, image_dir):
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "list.txt").write_text(
        "# comment\n\n../photos/cats/a.jpg,cat\n../photos/dogs/Ünï códe.JPEG , dog\n"
        "../photos/top.png\n../photos/gone.jpg,cat\n", encoding="utf-8")
    src = open_source(str(sub / "list.txt"))
    assert len(src) == 4 and src.class_names == ["cat", "dog"]
    assert list(src.labels()) == [0, 1, -1, 0]
    assert src.path(1) == str(image_dir / "dogs" / "Ünï códe.JPEG")
    assert src.load(1).size == (6, 4)
    with pytest.raises(ImageRejected, match="missing file"):
        src.load(3)

    (sub / "list.csv").write_text(
        'path,label\n../photos/cats/a.jpg,3\n"../photos/dogs/Ünï códe.JPEG",0\n', encoding="utf-8")
    src = open_source(str(sub / "list.csv"))
    assert list(src.labels()) == [3, 0] and src.class_names == ["0", "1", "2", "3"]
    assert src.load(1).mode == "RGB"


def test_txt_comma_inside_path(tmp_path):
    _img(tmp_path / "a,b.jpg")
    (tmp_path / "l.txt").write_text("a,b.jpg\na,b.jpg,7\n")
    src = open_source(str(tmp_path / "l.txt"))
    assert [os.path.basename(src.path(i)) for i in range(2)] == ["a,b.jpg"] * 2
    assert list(src.labels()) == [-1, 7]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dir(tmp_path, gz):
    root = _idx_dir(tmp_path / "idx", gz=gz)
    train, test = open_source(f"{root}:train"), open_source(f"{root}:test")
    assert (len(train), len(test)) == (12, 5)
    assert list(train.labels()) == [i % 10 for i in range(12)] and train.class_names == [str(k) for k in range(10)]
    im = train.load(3)
    assert im.mode == "RGB" and im.size == (28, 28)
    assert train.path(3).endswith("#3") and train.spec == f"{root}:train"


def test_idx_corrupt(tmp_path):
    root = _idx_dir(tmp_path / "idx", gz=False)
    data = (root / "train-images-idx3-ubyte").read_bytes()
    (root / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(HashsearchError, match="corrupt"):
        open_source(f"{root}:train").load(0)
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"\x12\x34garbage")
    with pytest.raises(HashsearchError, match="not an IDX"):
        open_source(f"{root}:test")


def test_synthetic_deterministic():
    a, b = open_source("synthetic:1000"), open_source("synthetic:1000:32")
    assert len(a) == 1000 and a.spec == b.spec == "synthetic:1000:32"
    assert np.array_equal(np.asarray(a.load(17)), np.asarray(b.load(17)))
    assert not np.array_equal(np.asarray(a.load(17)), np.asarray(a.load(18)))
    assert not np.array_equal(np.asarray(a.load(7)), np.asarray(a.load(17)))
    assert a.label(17) == 7 and list(a.labels()[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert a.class_names[3] == "class3" and a.path(5) == "synthetic:5"
    assert open_source("synthetic:3:64").load(2).size == (64, 64)
    assert a.fingerprint() == b.fingerprint() != open_source("synthetic:1001").fingerprint()


def test_limit(image_dir):
    src = open_source(str(image_dir), limit=2)
    assert len(src) == 2 and src.class_names == ["cats", "dogs"]
    assert len(open_source("synthetic:100", limit=7)) == 7
    assert len(open_source("synthetic:5", limit=70)) == 5
    assert open_source(str(image_dir)).fingerprint() != src.fingerprint()


def test_fashion_mnist_from_env(tmp_path, monkeypatch):
    _idx_dir(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("HASHSEARCH_DATA", str(tmp_path / "data"))
    src = open_source("fashion-mnist:test", limit=3)
    assert src.spec == "fashion-mnist:test" and len(src) == 3
    assert src.class_names == FASHION_MNIST_CLASSES
    assert src.path(0).startswith(str(tmp_path))
    # data_dir comes first
    other = _idx_dir(tmp_path / "other", n_test=4)
    assert len(open_source("fashion-mnist:test", data_dir=str(other))) == 4


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HASHSEARCH_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", (str(tmp_path / "nope"),))
    with pytest.raises(HashsearchError, match="apt-get install dataset-fashion-mnist"):
        open_source("fashion-mnist:train")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("HASHSEARCH_DATA", raising=False)
    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", ("/usr/share/datasets/fashion-mnist",))
    train, test = open_source("fashion-mnist:train"), open_source("fashion-mnist:test")
    assert (len(train), len(test)) == (60000, 10000)
    for src in (train, test):
        assert src.labels().min() == 0 and src.labels().max() == 9
    assert test.load(9999).size == (28, 28)


def test_pickle_roundtrip(tmp_path, image_dir):
    root = _idx_dir(tmp_path / "idx")
    for spec in (str(image_dir), f"{root}:train", "synthetic:50"):
        src = open_source(spec)
        src.load(0)  # warm caches must not break pickling
        copy = pickle.loads(pickle.dumps(src))
        assert len(copy) == len(src) and copy.fingerprint() == src.fingerprint()
        assert np.array_equal(np.asarray(copy.load(1)), np.asarray(src.load(1)))


@pytest.mark.parametrize("make_spec, match", [
    (lambda p: str(p / "missing"), "source not found"),
    (lambda p: "mnist:train", "source not found"),
    (lambda p: "synthetic:abc", "bad synthetic"),
    (lambda p: "synthetic:0", "bad synthetic"),
    (lambda p: "fashion-mnist:val", "bad source"),
    (lambda p: str(p), "no images found"),
    (lambda p: f"{_idx_dir(p / 'i')}:valid", "bad split"),
    (lambda p: f"{p}:train", "no IDX files"),
    (lambda p: (p / "empty.txt").write_text("# nothing\n\n") and str(p / "empty.txt"), "no images listed"),
    (lambda p: (p / "x.json").write_text("{}") and str(p / "x.json"), "unknown source"),
])
def test_errors(tmp_path, make_spec, match):
    (tmp_path / "notes.md").write_text("no images here")
    with pytest.raises(HashsearchError, match=match):
        open_source(make_spec(tmp_path))


def test_idx_dir_without_split_hints(tmp_path):
    root = _idx_dir(tmp_path / "idx")
    with pytest.raises(HashsearchError, match=r":train"):
        open_source(str(root))
