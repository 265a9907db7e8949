"""imgclf: fine-tune CNNs, export verified ONNX models, serve them with BentoML and ONNX Runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgclf")  # pyproject.toml is the one source of the version
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
