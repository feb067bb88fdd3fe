"""Finite JSON numbers beyond float32's range are the client's error (422), never a 500.

Found by the schemathesis fuzz in a full suite run: ``{"inputs": [[1.7976931348623155e+308],
...]}`` answered 500. numpy's float32 cast of such a number warns ("overflow encountered in
cast"); pytest runs with ``filterwarnings = error`` (and an operator may set
``PYTHONWARNINGS=error``), so the warning was raised as an exception on the request thread,
one the error table does not map. It reproduced only in some runs because the fuzz does not
draw that example every time. Each test below turns warnings into errors itself, so it fails
without the fix whatever the pytest configuration.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bases import InputError
from bases.inputs import ImagePreprocessor, TensorPreprocessor
from tests.app.conftest import live_server, settings_for

FLOAT64_NEAR_MAX = 1.7976931348623155e+308  # the fuzz's value: finite in JSON and float64
OVER_FLOAT32 = 1e39  # finite in float64, +inf in float32
RANGE = "beyond float32's range"


@contextmanager
def warnings_are_errors() -> Iterator[None]:
    """Every warning raised as an exception, on every thread (the filters are global)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("big", [FLOAT64_NEAR_MAX, OVER_FLOAT32, -OVER_FLOAT32])
def test_a_vector_beyond_float32_is_an_input_error(big: float) -> None:
    pre = TensorPreprocessor((4,))
    with warnings_are_errors(), pytest.raises(InputError, match=f"input 1: .*{RANGE}"):
        pre.decode_inputs([[1.0, 2.0, 3.0, 4.0], [1.0, big, 3.0, 4.0]])


def test_the_largest_float32_values_are_accepted() -> None:
    with warnings_are_errors():
        (t,) = TensorPreprocessor((2,)).decode_inputs([[3.4e38, -3.4e38]])
    assert t.tolist() == pytest.approx([3.4e38, -3.4e38], rel=1e-6)


def test_the_wrong_shape_is_still_named_first() -> None:
    with warnings_are_errors(), pytest.raises(InputError, match=r"shape \[1\], expected \[4\]"):
        TensorPreprocessor((4,)).decode_inputs([[FLOAT64_NEAR_MAX]])


def test_a_pixel_array_beyond_float32_is_an_input_error() -> None:
    with warnings_are_errors(), pytest.raises(InputError, match="within 0-255"):
        ImagePreprocessor(8).decode_inputs([[[0.0, OVER_FLOAT32], [1.0, 2.0]]])


def _vector(big: float) -> list[float]:
    return [big] + [0.01 * i for i in range(63)]  # tiny-mlp: 64 features


def test_over_http_both_protocols_answer_422_naming_the_range(tiny_base_dir: Path,
                                                               tmp_path: Path) -> None:
    fuzzed = {"inputs": [[FLOAT64_NEAR_MAX], [], [True, 21959, 141], {"x": []},
                         [-2.93747073454691e+16, 752, None], [], 1591, {}],
              "explain": True, "top_k": 413, "components": None, "composition": None,
              "normalize": None}
    with live_server(settings_for(tiny_base_dir, tmp_path / "registry")) as url, \
            httpx.Client(base_url=url, timeout=30) as client, warnings_are_errors():
        first = client.post("/v1/predict", json=fuzzed)  # the fuzz's body: a 500 before
        assert first.status_code == 422, first.text
        assert first.json()["error"] == "input 0: shape [1], expected [64]"
        for big in (FLOAT64_NEAR_MAX, -OVER_FLOAT32):
            native = client.post("/v1/predict", json={"inputs": [_vector(0.5), _vector(big)],
                                                      "explain": True})
            assert native.status_code == 422, native.text
            assert native.json()["error"].startswith("input 1: ")
            assert RANGE in native.json()["error"]
        model = client.get("/v1/base").json()["name"]
        v2 = client.post(f"/v2/models/{model}/infer", json={"inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32",
             "data": _vector(OVER_FLOAT32)}]})
        assert v2.status_code == 422, v2.text
        assert RANGE in v2.json()["error"]
        fine = client.post("/v1/predict", json={"inputs": [_vector(0.5)], "explain": True})
        assert fine.status_code == 200, fine.text
