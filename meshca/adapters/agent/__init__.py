"""``meshca agent``'s edges: the CA server client, the Unix socket, the Workload API,
Envoy SDS and the output directory."""
