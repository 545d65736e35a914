from longmem.models.transformer import IGNORE_INDEX, LMOutput, MemoryLM

__all__ = ["IGNORE_INDEX", "LMOutput", "MemoryLM"]
