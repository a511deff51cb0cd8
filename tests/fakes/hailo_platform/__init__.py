"""Contract fake of HailoRT's Python package ``hailo_platform`` (test-only; never shipped).

Exports as in the real ``hailo_platform/__init__.py`` (hailo-ai/hailort@hailo8, 4.23.0): the public names are
imported from ``hailo_platform.pyhailort.pyhailort`` and ``__version__`` is "4.23.0". The simulated machine lives in
``hailo_platform._fake_system`` (fake-only).
"""

from hailo_platform.pyhailort.pyhailort import (
    HEF,
    ConfigureParams,
    Device,
    FormatOrder,
    FormatType,
    HailoRTException,
    HailoSchedulingAlgorithm,
    HailoStreamInterface,
    InferVStreams,
    InputVStreamParams,
    OutputVStreamParams,
    VDevice,
)

__version__ = "4.23.0"
__all__ = [
    "HEF",
    "ConfigureParams",
    "Device",
    "FormatOrder",
    "FormatType",
    "HailoRTException",
    "HailoSchedulingAlgorithm",
    "HailoStreamInterface",
    "InferVStreams",
    "InputVStreamParams",
    "OutputVStreamParams",
    "VDevice",
]
