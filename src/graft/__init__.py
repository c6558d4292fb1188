"""graft: adapt pretrained image models to your own images."""

__version__ = "0.1.0"
