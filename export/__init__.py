"""Export stage: the seed architectures in PyTorch, exported to the ONNX model repository.

Needs torch and onnx; the service never imports this package.
"""
