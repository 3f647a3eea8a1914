"""Evaluation: latent diagnostics and verdicts, samples, and the Figure 4 protocol."""
