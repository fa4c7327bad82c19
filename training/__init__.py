"""Offline pipeline: MNIST data, target networks, SGD / MC-Dropout / SGLD, APD distillation,
ONNX export and the evaluation suite. Produces the generator checkpoint that ``service/`` serves.
"""
