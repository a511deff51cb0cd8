"""Contract fake of the ``hailo_platform.pyhailort`` package (test-only)."""
