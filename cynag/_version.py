"""The version of cynag, in one place.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``) without importing
the package, so this file holds nothing but the literal assignment.
"""
__version__ = "0.1.0"
