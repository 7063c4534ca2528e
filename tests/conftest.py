"""Fixtures for every test module, from the plugins in tests/support (see its README in
tests/support/__init__.py)."""

pytest_plugins = ["tests.support.fixtures", "tests.support.llama_cpp_fixtures"]
