"""Backbones and what is built on them: the model registry and ``build_model`` (``backbones``), and the
foundation-model fine-tuning (``foundation``: adapters, LoRA, the text-initialised head)."""
