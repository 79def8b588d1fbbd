"""LLaMA Board Portal: multi-user web portal for no-code LLM fine-tuning."""

__version__ = "0.1.0"
