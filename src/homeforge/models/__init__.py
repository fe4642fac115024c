"""Models: built-in presets (transformers classes) and Hugging Face model directories."""
