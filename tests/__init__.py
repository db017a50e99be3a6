"""The c360 test suite."""
