"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``, as Triton serves it)."""
