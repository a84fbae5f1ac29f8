"""Helpers the test packages share: servers, stand-ins, event factories and request cases.

Test modules import from here, never from a conftest.py or from another test module; the
conftest.py files hold only hooks and fixtures (which may use these helpers)."""
