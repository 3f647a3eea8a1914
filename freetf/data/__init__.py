"""Training data: the paper's synthetic task, byte-level text and memory-mapped token files."""
