"""Launchers: Cloud TPU slices through gcloud (tpu.py), N simulated hosts on one machine (local.py)."""
