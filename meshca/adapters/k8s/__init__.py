"""Kubernetes service-account token attestation: offline (JWKS) and online (TokenReview)."""
