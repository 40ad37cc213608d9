"""llmtrain: end-to-end LLM pretraining from YAML configs."""

__version__ = "0.1.0"
