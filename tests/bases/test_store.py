"""Base directories: create, load, verify the fingerprint; refuse tampered or impossible bases."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bases import (
    BaseNotFoundError,
    BaseSpec,
    BaseSpecError,
    TamperedBaseError,
    init_base,
    load_base,
    make_spec,
)
from bases.inputs import TensorPreprocessor
from tangent import UnsupportedOpError
from tests.bases import factories
from tests.bases.conftest import JIT_WARNING

pytestmark = pytest.mark.filterwarnings(JIT_WARNING)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _nudge_one_value(base_dir: Path, rnd: random.Random, prefix: str = "") -> str:
    """Move one float of θ0 by one ulp, written back into theta0.safetensors."""
    path = base_dir / "theta0.safetensors"
    tensors = load_file(str(path))
    names = sorted(n for n, t in tensors.items() if t.is_floating_point() and n.startswith(prefix))
    name = rnd.choice(names)
    flat = tensors[name].view(-1)
    i = rnd.randrange(flat.numel())
    flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf")))
    save_file(tensors, str(path))
    return f"{name}[{i}]"


# -- create and load ------------------------------------------------------------------------

def test_tiny_base_round_trip(tiny_dir: Path, tiny_base: object) -> None:
    base = load_base(tiny_dir)
    assert base.fingerprint == (tiny_dir / "fingerprint").read_text().strip()
    assert len(base.fingerprint) == 64
    assert base.spec == BaseSpec.from_json((tiny_dir / "spec.json").read_bytes())
    assert base.spec.preset == "tiny-mlp" and base.spec.input_kind == "tensor"
    assert base.labels == [str(i) for i in range(10)]
    assert list(base.region) == ["hidden2.0.weight", "hidden2.0.bias", "classifier.weight",
                                 "classifier.bias"]
    assert base.region["classifier.weight"].shape == (10, 32)
    assert base.net.split_index == 1
    assert isinstance(base.preprocessor, TensorPreprocessor) and base.preprocessor.shape == (64,)


def test_init_is_deterministic_and_seeded(tmp_path: Path) -> None:
    spec = make_spec("tiny-mlp", head_seed=3)
    a = init_base(tmp_path / "a", spec)
    assert init_base(tmp_path / "b", spec) == a
    assert init_base(tmp_path / "c", make_spec("tiny-mlp", head_seed=4)) != a
    assert init_base(tmp_path / "d", make_spec("tiny-mlp", head_seed=3, name="other")) != a


def test_init_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "base"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(BaseSpecError, match="not empty"):
        init_base(out, make_spec("tiny-mlp"))
    assert (out / "keep.txt").exists()
    fp = init_base(out, make_spec("tiny-mlp"), force=True)
    assert load_base(out).fingerprint == fp and not (out / "keep.txt").exists()


@pytest.mark.parametrize(("preset", "kwargs", "fragment"), [
    ("nope", {}, "unknown preset 'nope'"),
    ("tiny-mlp", {"labels": ["a", "a"]}, "distinct"),
    ("effnet-lite0", {"options": {"tangent_blocks": 17}}, "tangent_blocks must be within 0..16"),
    ("minilm", {"options": {"tangent_layers": 7}}, "tangent_layers must be within 0..6"),
    ("tiny-mlp", {"options": {"tangent_stages": 0}}, "tangent_stages must be within 1..3"),
    ("tiny-mlp", {"options": {"tangent_stages": 4}}, "tangent_stages must be within 1..3"),
    ("generic", {"labels": ["a"]}, "explicit tangent patterns"),
    # an option of the wrong JSON type is named (int() of a list or None was a TypeError)
    ("tiny-mlp", {"options": {"tangent_stages": [2]}}, "option 'tangent_stages'"),
    ("effnet-lite0", {"options": {"tangent_blocks": None}}, "option 'tangent_blocks'"),
])
def test_impossible_specs(preset: str, kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(BaseSpecError) as info:
        make_spec(preset, **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_tangent_patterns_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(BaseSpecError, match="match no parameter"):
        init_base(tmp_path / "b", make_spec("tiny-mlp", tangent=["nope.*"]))
    assert not (tmp_path / "b").exists()


def test_default_tangent_regions() -> None:
    assert make_spec("effnet-lite0").tangent == ["head.*", "classifier.*"]
    assert make_spec("effnet-lite0", options={"tangent_blocks": 2}).tangent == [
        "block14.*", "block15.*", "head.*", "classifier.*"]
    assert make_spec("effnet-lite0", options={"tangent_blocks": 16}).tangent[:2] == [
        "stem.*", "block0.*"]
    assert make_spec("minilm", options={"tangent_layers": 2}).tangent == [
        "layer4.*", "layer5.*", "classifier.*"]
    assert make_spec("minilm").files.keys() == {"tokenizer.json"}


# -- the fingerprint detects tampering ------------------------------------------------------

def test_one_changed_value_in_theta0(tiny_dir: Path, tmp_path: Path, seed: int) -> None:
    base_dir = _copy(tiny_dir, tmp_path)
    where = _nudge_one_value(base_dir, random.Random(seed))
    with pytest.raises(TamperedBaseError) as info:
        load_base(base_dir)
    assert "does not match its fingerprint" in str(info.value), f"{where} seed={seed}"
    assert "tmc base init" in str(info.value)


def test_edited_spec(tiny_dir: Path, tmp_path: Path) -> None:
    base_dir = _copy(tiny_dir, tmp_path)
    spec = json.loads((base_dir / "spec.json").read_text())
    spec["labels"][0] = "zero"
    (base_dir / "spec.json").write_text(json.dumps(spec, sort_keys=True, separators=(",", ":")))
    with pytest.raises(TamperedBaseError, match="fingerprint"):
        load_base(base_dir)
    (base_dir / "spec.json").write_text("{not json")
    with pytest.raises(TamperedBaseError, match="not a valid base spec"):
        load_base(base_dir)
    (base_dir / "spec.json").write_text('{"name": "x"}')
    with pytest.raises(TamperedBaseError, match="not a valid base spec"):
        load_base(base_dir)


def test_edited_or_missing_files(tiny_dir: Path, tmp_path: Path, gen: torch.Generator) -> None:
    base_dir = _copy(tiny_dir, tmp_path / "fp")
    (base_dir / "fingerprint").write_text("0" * 64 + "\n")
    with pytest.raises(TamperedBaseError, match="fingerprint"):
        load_base(base_dir)
    (base_dir / "fingerprint").unlink()
    with pytest.raises(TamperedBaseError, match="fingerprint"):
        load_base(base_dir)

    base_dir = _copy(tiny_dir, tmp_path / "extra")
    tensors = load_file(str(base_dir / "theta0.safetensors"))
    tensors["extra.weight"] = torch.randn(3, generator=gen)
    save_file(tensors, str(base_dir / "theta0.safetensors"))
    with pytest.raises(TamperedBaseError):
        load_base(base_dir)

    base_dir = _copy(tiny_dir, tmp_path / "gone")
    (base_dir / "theta0.safetensors").unlink()
    with pytest.raises(TamperedBaseError, match="cannot read"):
        load_base(base_dir)

    base_dir = _copy(tiny_dir, tmp_path / "junk")
    (base_dir / "theta0.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(TamperedBaseError, match="cannot read"):
        load_base(base_dir)


def test_missing_base(tmp_path: Path) -> None:
    for path in (tmp_path / "nothing-here", tmp_path):
        with pytest.raises(BaseNotFoundError) as info:
            load_base(path)
        assert str(path) in str(info.value) and "tmc base init" in str(info.value)


@pytest.mark.slow
def test_one_changed_value_in_a_real_backbone(effnet_dir: Path, tmp_path: Path,
                                              seed: int) -> None:
    base_dir = _copy(effnet_dir, tmp_path)
    where = _nudge_one_value(base_dir, random.Random(seed), prefix="block")  # frozen trunk too
    with pytest.raises(TamperedBaseError, match="fingerprint"):
        load_base(base_dir)
    print("changed", where)


@pytest.mark.slow
def test_modified_or_missing_tokenizer(minilm_dir: Path, tmp_path: Path) -> None:
    base_dir = _copy(minilm_dir, tmp_path / "edit")
    tok = base_dir / "tokenizer.json"
    data = tok.read_bytes()
    tok.write_bytes(data.replace(b'"[UNK]"', b'"[UNX]"', 1))
    with pytest.raises(TamperedBaseError) as info:
        load_base(base_dir)
    assert "tokenizer.json" in str(info.value) and "modified" in str(info.value)
    tok.unlink()
    with pytest.raises(TamperedBaseError, match="tokenizer.json"):
        load_base(base_dir)


# -- the generic preset and ops without forward-mode AD -------------------------------------

def _generic(tmp_path: Path, factory: str, net: torch.nn.Module, input_shape: list[int],
             tangent: list[str]) -> Path:
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    spec = make_spec("generic", labels=["a", "b", "c"], tangent=tangent, options={
        "factory": f"tests.bases.factories:{factory}", "weights": str(weights),
        "input_shape": input_shape})
    init_base(tmp_path / "base", spec)
    return tmp_path / "base"


def test_generic_base(tmp_path: Path, gen: torch.Generator, seed: int) -> None:
    net = factories.mlp(d=12)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    base = load_base(_generic(tmp_path, "mlp", net, [12], ["out.*"]))
    assert list(base.region) == ["out.weight", "out.bias"] and base.spec.input_kind == "tensor"
    x = torch.randn(4, 12, generator=gen)
    with torch.no_grad():
        assert torch.equal(base.net.forward(x), net(x)), f"seed={seed}"  # θ0 from the file


def test_generic_base_errors(tmp_path: Path) -> None:
    with pytest.raises(BaseSpecError, match="must return an nn.Sequential"):
        init_base(tmp_path / "b", make_spec("generic", labels=["a"], tangent=["*"], options={
            "factory": "tests.bases.factories:not_sequential", "weights": "x"}))
    with pytest.raises(BaseSpecError, match="module:callable"):
        init_base(tmp_path / "c", make_spec("generic", labels=["a"], tangent=["*"], options={
            "factory": "no-colon"}))
    with pytest.raises(BaseSpecError, match="option 'factory' must be a string"):
        init_base(tmp_path / "d", make_spec("generic", labels=["a"], tangent=["*"], options={
            "factory": 5}))
    for i, shape in enumerate((["x"], [[12]])):  # int() raised ValueError, then TypeError
        (tmp_path / f"e{i}").mkdir()
        with pytest.raises(BaseSpecError, match=r"option 'input_shape': .* is not an integer"):
            load_base(_generic(tmp_path / f"e{i}", "mlp", factories.mlp(d=12),
                               shape, ["out.*"]))  # type: ignore[arg-type]


def test_fused_attention_in_tangent_region_fails_at_load(tmp_path: Path) -> None:
    base_dir = _generic(tmp_path, "sdpa_net", factories.sdpa_net(), [5, 8],
                        ["attn.*", "classifier.*"])
    with pytest.raises(UnsupportedOpError) as info:
        load_base(base_dir)
    msg = str(info.value)
    assert "_scaled_dot_product_flash_attention_for_cpu" in msg, msg
    assert "eager" in msg and "no forward-mode AD" in msg, msg
    assert load_base(base_dir, check_forward_ad=False).region  # opt-out for inspection only


def test_fused_attention_in_frozen_trunk_is_fine(tmp_path: Path, gen: torch.Generator) -> None:
    base = load_base(_generic(tmp_path, "sdpa_net", factories.sdpa_net(), [5, 8],
                              ["classifier.*"]))
    x = torch.randn(3, 5, 8, generator=gen)
    delta = base.net.random_delta(gen)
    assert not torch.equal(base.net.forward(x, delta), base.net.forward(x))
