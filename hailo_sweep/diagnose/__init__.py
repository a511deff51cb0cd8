"""Diagnosis of a trial: named findings (mistakes between host code, model and device), the error ladder that says
which step costs the accuracy, plots, and one self-contained HTML report."""

from hailo_sweep.diagnose.findings import FINDING_CODES, Evidence, Finding, run_all
from hailo_sweep.diagnose.ladder import dominant_step, explain, ladder_steps

__all__ = ["FINDING_CODES", "Evidence", "Finding", "dominant_step", "explain", "ladder_steps", "run_all"]
