"""The inference service: batching, model sessions and the HTTP API."""
