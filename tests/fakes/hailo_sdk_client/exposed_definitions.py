"""Contract fake of ``hailo_sdk_client.exposed_definitions`` (test-only).

Source: MZ ``main_utils.py`` L7 / ``main_driver.py`` (``from hailo_sdk_client.exposed_definitions import States``),
ACE diag main.py L119; members listed in hailo-api.md §1.1 "Runner state".
"""

from __future__ import annotations

import enum


class States(str, enum.Enum):
    UNINITIALIZED = "uninitialized"
    HAILO_MODEL = "hailo_model"
    QUANTIZED_MODEL = "quantized_model"
    COMPILED_MODEL = "compiled_model"

