"""Test-only code shared by the tests (and nothing in the packages): the NumPy fake engine."""
