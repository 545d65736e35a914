"""Pretrained Llama-family models in: Hugging Face folders and llama.cpp GGUF files read into one
:class:`Checkpoint`, their chat templates rendered, and the known models fetched into a cache."""
from longmem.pretrained.checkpoint import (SUPPORTED_MODEL_TYPES, Checkpoint, read_checkpoint, read_gguf,
                                           read_hf_folder)

__all__ = ["SUPPORTED_MODEL_TYPES", "Checkpoint", "read_checkpoint", "read_gguf", "read_hf_folder"]
