"""The service fixtures of tests/app, shared with the fuzz suite."""

from tests.app.conftest import tiny_base_dir  # noqa: F401
