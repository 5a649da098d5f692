"""The gRPC surface: generated stubs (v1/), the servicer, interceptors and server factory."""
