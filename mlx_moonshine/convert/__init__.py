"""Conversion: Moonshine's ONNX/ORT graphs (and the PyPI wheels that ship them) read, dequantised, named and written as HF weights."""
