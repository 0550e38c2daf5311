"""Conversion: Moonshine's ONNX/ORT graphs (and the PyPI wheels that ship them) read into Hugging Face weights."""
