"""Anomaly detection and alerts; see README "Alert rules"."""
