"""The commands that run a study: the KL sweep, the synthetic reproduction and the
code-corpus comparison (their logic lives in :mod:`freetf.sweeps` and
:mod:`freetf.experiments`)."""
