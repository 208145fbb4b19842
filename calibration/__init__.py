"""Threshold calibration on good parts (pure numpy; no torch)."""
