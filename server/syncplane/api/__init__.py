"""The gRPC surface: the servicer, its interceptor and the server factory (the stubs they serve are
generated into :mod:`syncplane.proto`)."""
