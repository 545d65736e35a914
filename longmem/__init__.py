"""longmem: language models that remember beyond their attention window."""
from longmem.config import DataConfig, MemoryConfig, ModelConfig, RunConfig, TrainConfig
from longmem.models import LMOutput, MemoryLM
from longmem.models.memory import State
import longmem.classic  # noqa: E402,F401  (registers the baselines' architectures)

__version__ = "0.1.0"
__all__ = ["DataConfig", "LMOutput", "MemoryConfig", "MemoryLM", "ModelConfig", "RunConfig", "State",
           "TrainConfig", "__version__"]
