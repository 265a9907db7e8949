"""gRPC stubs of the Open Inference Protocol (KServe V2), generated and committed.

``grpc_predict_v2.proto`` is KServe's file unchanged; ``triton_model_config.proto`` is the subset of
Triton's ModelConfig RPC that perf_analyzer needs; ``triton_extensions.proto`` holds Triton's
statistics extension and ``ModelStreamInferResponse``. How they were generated, and how to regenerate
them: README.md here and ``python -m service.http.v2.proto.generate``.
"""
