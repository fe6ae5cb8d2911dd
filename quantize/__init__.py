"""Quantization library under the runtime: weight schemes, quantized linears, 4-bit umT5, the on-disk format.

It never imports the rest of `scail2_lite` (see ARCHITECTURE.md): callers hand it (name, tensor) iterators.
"""
