"""The two Moonshine architectures (moonshine.py, streaming.py), the layers they share, the decoder KV cache and the CPU kernels."""
