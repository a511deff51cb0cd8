"""hailo-sweep: sweep Hailo quantization settings with Optuna, measure every stage's error, track it all in MLflow."""

__version__ = "0.1.0"
