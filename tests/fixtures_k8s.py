"""Kubernetes API stand-in fixtures (OIDC discovery, JWKS, TokenReview)."""
