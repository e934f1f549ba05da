"""Judging a model the way its users do: token-level statistics against a reference, and quality budgets.

``edgekd eval MODEL --against TEACHER`` (edgekd.quality.check.evaluate): MODEL is a GGUF file
(scored in llama.cpp), an ONNX file or onnxruntime-genai folder (onnxruntime), a Hugging Face
directory (torch) or an edgekd run directory (each exported file against the run's teacher and
against its own QAT master, so export loss and training loss are told apart).
"""
