"""metalearn: MAML and its variants, batched over tasks."""

__version__ = "0.1.0"
