"""Test and try-it support: random-weight model files, ComfyUI loading helpers and recorders."""
