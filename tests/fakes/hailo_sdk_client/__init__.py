"""Contract fake of Hailo's Dataflow Compiler package ``hailo_sdk_client`` (test-only; never shipped).

Import names as public code uses them: ``from hailo_sdk_client import ClientRunner, InferenceContext`` (MZ
main_driver.py L10; LUX inferer.py) and ``hailo_sdk_client.__version__`` (LUX exporter.py ``exporter_buildinfo``).
The version is that of the DFC the Hailo-8 Model Zoo v2.18 pairs with (hailo-api.md source key "MZ").
"""

from hailo_sdk_client._client_runner import ClientRunner, InferenceContext

__version__ = "3.33.0"
__all__ = ["ClientRunner", "InferenceContext", "__version__"]
