"""The Free Transformer (Algorithm 2), its binary mapper (eq. 8) and its losses (eq. 5)."""

from freetf.model.transformer import FreeTransformer

__all__ = ["FreeTransformer"]
