"""LoRA fine-tuning (``lora``) and the LLM model space (``space``): the only modules of the
coordinator that import torch, transformers or peft."""
