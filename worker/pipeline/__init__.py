"""Worker pipeline: preprocess, inference core, heat maps."""
