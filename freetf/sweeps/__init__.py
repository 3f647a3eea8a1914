"""Sweeps: the Ray Tune search over the KL settings, its report, and the reproduction."""
