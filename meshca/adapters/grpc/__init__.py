"""The gRPC surface: servicers, the error mapping and the server."""
