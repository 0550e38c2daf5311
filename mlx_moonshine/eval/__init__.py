"""Evaluation: WER/CER over manifests, the real-speech canary, comparing runs, and the one verdict rule."""
