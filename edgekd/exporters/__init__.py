"""Exporters: GGUF for llama.cpp, ONNX for onnxruntime, and the parity checks that validate them."""
