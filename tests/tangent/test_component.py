"""Component files: encode/decode round trip, and every validation error says what is wrong."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from tangent import (
    FORMAT,
    ComponentError,
    ComponentTooLargeError,
    LinearizedNet,
    MissingMetadataError,
    NonFiniteError,
    NotSafetensorsError,
    TangentError,
    TangentParam,
    UnknownTensorError,
    WrongBaseError,
    WrongDtypeError,
    WrongShapeError,
    decode_component,
    encode_component,
    read_metadata,
)
from tests.tangent import toy


@pytest.fixture
def region(gen: torch.Generator) -> dict[str, TangentParam]:
    # mid.0.weight [20, 20], mid.0.bias [20], out.weight [5, 20], out.bias [5]
    return LinearizedNet(toy.mlp(gen), ["mid.*", "out.*"]).region


@pytest.fixture
def fp(gen: torch.Generator) -> str:
    return bytes(torch.randint(0, 256, (32,), generator=gen, dtype=torch.uint8).tolist()).hex()


def _tangent(region: dict[str, TangentParam], gen: torch.Generator,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {n: torch.randn(p.shape, generator=gen).to(dtype) for n, p in region.items()}


PROVENANCE = {"data": "shard-3 of fashion-mnist train — ünïcode ✓", "classes": ["coat", "shirt"],
              "samples": 1234, "loss": 0.0625, "epochs": 50, "created": "2024-05-01T12:00:00Z"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_with_metadata(region: dict[str, TangentParam], fp: str,
                                  gen: torch.Generator, dtype: torch.dtype) -> None:
    tensors = _tangent(region, gen, dtype)
    data = encode_component(tensors, fp, PROVENANCE)
    comp = decode_component(data, fp, region)
    assert comp.digest == hashlib.sha256(data).hexdigest() and comp.nbytes == len(data)
    assert set(comp.tensors) == set(tensors)
    for name, t in tensors.items():
        assert comp.tensors[name].dtype == dtype
        assert torch.equal(comp.tensors[name], t), name
    assert comp.metadata["format"] == FORMAT and comp.metadata["base_fingerprint"] == fp
    assert comp.metadata["data"] == PROVENANCE["data"]  # strings stay as they are
    for key in ("classes", "samples", "loss", "epochs"):
        assert json.loads(comp.metadata[key]) == PROVENANCE[key]
    assert read_metadata(data) == comp.metadata


def test_subset_of_region_and_non_contiguous_tensors(region: dict[str, TangentParam], fp: str,
                                                      gen: torch.Generator) -> None:
    w = torch.randn(tuple(reversed(region["out.weight"].shape)), generator=gen).t()
    assert not w.is_contiguous()
    comp = decode_component(encode_component({"out.weight": w}, fp), fp, region)
    assert list(comp.tensors) == ["out.weight"] and torch.equal(comp.tensors["out.weight"], w)
    empty = decode_component(encode_component({}, fp), fp, region)  # all zero: still valid
    assert empty.tensors == {}


def test_digest_is_content_addressed(region: dict[str, TangentParam], fp: str,
                                     gen: torch.Generator) -> None:
    tensors = _tangent(region, gen)
    a = decode_component(encode_component(tensors, fp, {"note": "x"}), fp, region)
    b = decode_component(encode_component(tensors, fp, {"note": "x"}), fp, region)
    c = decode_component(encode_component(tensors, fp, {"note": "y"}), fp, region)
    assert a.digest == b.digest != c.digest
    # encoding is a pure function, whatever order safetensors writes metadata in
    assert len({encode_component(tensors, fp, PROVENANCE) for _ in range(20)}) == 1


# -- every validation error -----------------------------------------------------------------

def _raises(exc: type[ComponentError], data: bytes, fp: str, region: dict[str, TangentParam],
            *fragments: str, max_bytes: int | None = None) -> str:
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    with pytest.raises(exc) as info:
        decode_component(data, fp, region, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ComponentError) and isinstance(info.value, TangentError)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_wrong_base_fingerprint(region: dict[str, TangentParam], fp: str,
                                gen: torch.Generator) -> None:
    other = hashlib.sha256(fp.encode()).hexdigest()
    data = encode_component(_tangent(region, gen), other)
    _raises(WrongBaseError, data, fp, region, other[:16], fp[:16])


def test_unknown_tensor_name(region: dict[str, TangentParam], fp: str,
                             gen: torch.Generator) -> None:
    tensors = _tangent(region, gen)
    tensors["inp.0.weight"] = torch.randn(20, 12, generator=gen)  # frozen trunk parameter
    _raises(UnknownTensorError, encode_component(tensors, fp), fp, region,
            "'inp.0.weight'", "not a parameter of the tangent region")


def test_wrong_shape(region: dict[str, TangentParam], fp: str, gen: torch.Generator) -> None:
    tensors = _tangent(region, gen)
    tensors["out.weight"] = torch.randn(20, 5, generator=gen)
    _raises(WrongShapeError, encode_component(tensors, fp), fp, region,
            "'out.weight'", "[20, 5]", "expected [5, 20]")
    tensors["out.weight"] = torch.randn(100, generator=gen)
    _raises(WrongShapeError, encode_component(tensors, fp), fp, region, "[100]")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int64, torch.uint8,
                                   torch.bool])
def test_wrong_dtype(region: dict[str, TangentParam], fp: str, gen: torch.Generator,
                     dtype: torch.dtype) -> None:
    tensors = _tangent(region, gen)
    tensors["mid.0.bias"] = (torch.randn(20, generator=gen) * 10).to(dtype)
    _raises(WrongDtypeError, encode_component(tensors, fp), fp, region,
            "'mid.0.bias'", str(dtype).removeprefix("torch."), "float32", "float16", "bfloat16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(region: dict[str, TangentParam], fp: str, gen: torch.Generator,
                           dtype: torch.dtype, bad: float) -> None:
    tensors = _tangent(region, gen, dtype)
    flat = tensors["out.weight"].view(-1)
    flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = bad
    _raises(NonFiniteError, encode_component(tensors, fp), fp, region,
            "'out.weight'", "NaN or infinite")


def test_missing_metadata(region: dict[str, TangentParam], fp: str,
                          gen: torch.Generator) -> None:
    tensors = _tangent(region, gen)
    _raises(MissingMetadataError, st_save(tensors), fp, region, "format", "base_fingerprint")
    only_format = st_save(tensors, metadata={"format": FORMAT})
    msg = _raises(MissingMetadataError, only_format, fp, region, "['base_fingerprint']")
    assert "GET /v1/base" in msg
    empty_fp = st_save(tensors, metadata={"format": FORMAT, "base_fingerprint": ""})
    _raises(MissingMetadataError, empty_fp, fp, region, "['base_fingerprint']")


def test_wrong_format(region: dict[str, TangentParam], fp: str, gen: torch.Generator) -> None:
    data = st_save(_tangent(region, gen),
                   metadata={"format": "tmc.component/2", "base_fingerprint": fp})
    _raises(MissingMetadataError, data, fp, region, "'tmc.component/2'", repr(FORMAT))


def test_oversize(region: dict[str, TangentParam], fp: str, gen: torch.Generator) -> None:
    data = encode_component(_tangent(region, gen), fp)
    _raises(ComponentTooLargeError, data, fp, region, f"{len(data)} bytes",
            f"limit of {len(data) - 1} bytes", max_bytes=len(data) - 1)
    decode_component(data, fp, region, max_bytes=len(data))  # at the limit is fine


def test_random_bytes_are_not_safetensors(region: dict[str, TangentParam], fp: str,
                                          gen: torch.Generator) -> None:
    for n in (3, 100, 5000):
        junk = bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
        _raises(NotSafetensorsError, junk, fp, region, "not")


@pytest.mark.parametrize("header", [
    b"not json at all", b"\xff\xfe\x00binary", b"[1, 2, 3]", b'{"__metadata__": ["a"]}',
    b'{"__metadata__": "x"}', b"[" * 100_000, b""])
def test_malformed_headers(region: dict[str, TangentParam], fp: str, header: bytes) -> None:
    data = struct.pack("<Q", len(header)) + header
    _raises(NotSafetensorsError, data, fp, region, "safetensors")


def test_truncated_file(region: dict[str, TangentParam], fp: str, gen: torch.Generator) -> None:
    data = encode_component(_tangent(region, gen), fp, PROVENANCE)
    (header_len,) = struct.unpack("<Q", data[:8])
    for cut in (4, 8, 20, 8 + header_len - 1, 8 + header_len + 3, len(data) - 1):
        msg = _raises(NotSafetensorsError, data[:cut], fp, region)
        assert "truncated" in msg or "not a valid safetensors" in msg or "bytes" in msg, msg


def test_trailing_garbage_is_rejected(region: dict[str, TangentParam], fp: str,
                                      gen: torch.Generator) -> None:
    data = encode_component(_tangent(region, gen), fp)
    _raises(NotSafetensorsError, data + b"\x00garbage", fp, region)


def test_empty_body(region: dict[str, TangentParam], fp: str) -> None:
    _raises(NotSafetensorsError, b"", fp, region, "0 bytes")
