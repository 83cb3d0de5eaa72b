"""The Open Inference Protocol (KServe v2) data plane, independent of the HTTP framework.

``codec`` turns a request body into a typed, validated :class:`~service.v2.codec.InferRequest`
and a result into response bytes (JSON, or JSON plus Triton's binary tensor data);
``metadata`` builds the server and model metadata documents; ``schemas`` holds
pydantic models of the JSON documents for the OpenAPI description. The HTTP
route (``service/http/v2.py``) only reads the body, calls these and runs the
batcher.
"""
