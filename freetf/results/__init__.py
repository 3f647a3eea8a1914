"""Results of sweeps, read from MLflow (no Ray): runs tables, verdicts and boundaries,
the collapse map, the phase diagram, boundaries over training."""
