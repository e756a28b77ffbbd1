"""Models: encoder registry, multitask training heads, slide-level classifiers."""
