"""imgclf: fine-tune CNNs, export verified ONNX models, serve them with BentoML and ONNX Runtime."""

__version__ = "0.1.0"
