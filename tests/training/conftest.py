"""Fixtures for training tests: a tiny-mlp base with sklearn digits, a small effnet base."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bases import Base, init_base, load_base, make_spec
from cli.train_args import add_train_parser
from training.data import Dataset, Splits, align_labels, load_digits, split_train_val_test

# torch 2.13: the first forward-AD call imports torch._decomp.decompositions_for_jvp, which
# calls the deprecated torch.jit.script (a DeprecationWarning from torch.jit._script).
JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bases") / "tiny"
    init_base(out, make_spec("tiny-mlp", head_seed=1))
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> Base:
    return load_base(tiny_dir, check_forward_ad=False)


@pytest.fixture(scope="session")
def digits(tiny: Base) -> Dataset:
    return align_labels(load_digits(), tiny.labels)


@pytest.fixture(scope="session")
def digit_splits(digits: Dataset) -> Splits:
    return split_train_val_test(digits, seed=0)


@pytest.fixture(scope="session")
def effnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bases") / "effnet32"
    init_base(out, make_spec("effnet-lite0", options={"image_size": 32}))
    return out


def parse_train(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tmc")
    add_train_parser(parser.add_subparsers())
    args: argparse.Namespace = parser.parse_args(["train", *argv])
    return args


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    from cli.train import run_train

    capsys.readouterr()  # drop what fixtures printed
    code = run_train(parse_train(argv))
    out, err = capsys.readouterr()
    return code, out, err
