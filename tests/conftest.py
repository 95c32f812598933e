"""Top-level pytest configuration: shared fixtures of the test environment are imported here."""
