"""Experiments built on the sweep engine: the synthetic reproduction (Figure 4) and the
code-corpus comparison."""
