"""freetf: a Ray-native trainer and hyperparameter tuner for the Free Transformer."""

from freetf.config import Config, ConfigError, load_config
from freetf.model import FreeTransformer

__all__ = ["Config", "ConfigError", "FreeTransformer", "load_config"]
__version__ = "0.1.0"
