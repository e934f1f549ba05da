"""The device side: what runs on the phone or the board itself, with no torch, transformers or onnx.

``edgekd bench`` (bench, measure, results), budget checks, energy, this host's measured
ceilings, the roofline cost model, and the runtime adapters (llama.cpp, onnxruntime,
onnxruntime-genai).
Every module here imports only edgekd's core dependencies and, inside the functions that
need it, its runtime; a test imports each one with torch, transformers and onnx blocked.
"""
