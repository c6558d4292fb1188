"""graft: adapt pretrained image models to your own images."""
