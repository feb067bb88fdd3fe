"""Fault tests reuse the service fixtures: tiny real bases, component files."""

from tests.app.conftest import tiny_base, tiny_base_dir  # noqa: F401
