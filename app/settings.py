"""Service settings: ``TMC_*`` environment variables, validated at startup.

A config file (``TMC_CONFIG_FILE``, JSON) may supply defaults; the environment wins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def tmc_home() -> Path:
    """Where tmc keeps its state: $TMC_HOME, else .tmc (read at each call)."""
    return Path(os.environ.get("TMC_HOME", ".tmc"))


def default_base_dir() -> Path:
    """The base directory when none is given: a non-empty $TMC_BASE_DIR, else
    ``tmc_home() / "base"`` (read at each call; the commands' --base/--out default)."""
    return Path(os.environ.get("TMC_BASE_DIR") or tmc_home() / "base")


# the Settings' defaults read $TMC_HOME once, at import (pydantic reads $TMC_BASE_DIR itself)
DEFAULT_HOME = tmc_home()


class Settings(BaseSettings):
    """Every knob of the service. Field ``x`` is read from ``TMC_X``."""

    model_config = SettingsConfigDict(env_prefix="TMC_", extra="ignore", frozen=True)

    base_dir: Path = Field(DEFAULT_HOME / "base", description="base model directory")
    registry_dir: Path = Field(DEFAULT_HOME / "registry", description="embedded registry")
    redis_url: str | None = Field(None, description="shared Redis registry, when set")
    blob_url: str | None = Field(
        None, description="where component bytes live: file:///path, redis, or "
        "s3://bucket/prefix (AWS_* variables configure S3); default: the registry folder "
        "(embedded) or Redis (shared)")
    admin_token: str | None = Field(None, description="bearer token of the admin API")
    inference_token: str | None = Field(None, description="optional token for inference")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: Literal["none", "tail", "all"] = Field(
        "none", description="torch.compile the tail's JVP (tail) and the trunk too (all)")
    torch_threads: int | None = Field(None, ge=1, le=1024,
                                      description="torch intra-op threads (None: torch's choice)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_queue_delay_ms: float = Field(2.0, ge=0.0, le=1000.0)
    max_queue_size: int = Field(1024, ge=1)
    request_timeout_s: float = Field(30.0, gt=0.0)
    max_inputs_per_request: int = Field(64, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_request_pixels: int = Field(
        64 * 1024 * 1024, ge=1, le=2**40,
        description="image pixels one request may declare in all (headers, before decoding)")
    decode_queue_size: int = Field(
        8, ge=0, le=24,
        description="image requests waiting for a decode thread beyond which new ones get 503")
    max_component_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    cache_bytes: int = Field(512 * 1024 * 1024, ge=0, description="device LRU budget")
    blob_cache_dir: Path | None = Field(
        None, description="this replica's byte cache when the bytes are shared (a Redis index, "
        "or s3:// bytes); None: in memory")
    fetch_threads: int = Field(
        4, ge=1, le=64,
        description="threads that fetch, verify and decode cold component versions at "
        "admission, off the device thread")
    fetch_queue_size: int = Field(
        16, ge=0, le=1024,
        description="requests waiting for cold component fetches of their own (each with any "
        "number of versions), beyond TMC_FETCH_THREADS, after which a request needing a new "
        "fetch gets 503")
    fetch_timeout_s: float = Field(
        20.0, gt=0.0,
        description="longest one cold component fetch may run, from when a fetch thread takes "
        "it (then 503 naming the version and the store); waiting for a thread counts against "
        "TMC_REQUEST_TIMEOUT_S only")
    fetch_max_request_bytes: int = Field(
        2 * 1024**3, ge=1024, le=2**44,
        description="host memory one request's cold component tensors may take while staged "
        "(413 beyond)")
    drain_timeout_s: float = Field(20.0, ge=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="log lines: json, text, or auto (json unless stderr is a terminal)")

    @field_validator("admin_token", "inference_token")
    @classmethod
    def _token_strength(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            raise ValueError("tokens must be at least 16 characters")
        return value

    @field_validator("base_dir", mode="before")
    @classmethod
    def _empty_base_dir_is_unset(cls, value: object) -> object:
        """An empty $TMC_BASE_DIR means unset, as in ``default_base_dir`` (was: the current
        directory for `tmc serve`, .tmc/base for the other commands)."""
        return DEFAULT_HOME / "base" if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value or None

    @field_validator("blob_url")
    @classmethod
    def _blob_scheme(cls, value: str | None) -> str | None:
        if value and not (value == "redis" or value.startswith(("file:///", "s3://"))):
            raise ValueError("blob_url must be file:///absolute/path, redis, or "
                             "s3://bucket[/prefix]")
        return value or None


def load_settings(**overrides: object) -> Settings:
    """Settings from the config file (if any), then the environment, then overrides."""
    file_values: dict[str, Any] = {}
    config_file = os.environ.get("TMC_CONFIG_FILE")
    if config_file:
        file_values = json.loads(Path(config_file).read_text())
    env_keys = {k[4:].lower() for k in os.environ if k.startswith("TMC_")}
    merged = {k: v for k, v in file_values.items() if k not in env_keys}
    return Settings(**{**merged, **overrides})


ENV_NAMES = tuple(f"TMC_{name.upper()}" for name in Settings.model_fields) + (
    "TMC_CONFIG_FILE", "TMC_HOME")
