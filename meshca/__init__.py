"""meshca: a zero-trust identity and certificate authority for service meshes."""

__version__ = "0.1.0"
