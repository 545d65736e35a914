"""Pretrained Llama-family models: Hugging Face folders and GGUF files in, Hugging Face folders out."""
