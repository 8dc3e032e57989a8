"""Alembic migrations of meshca's schema, shipped inside the package (``meshca db upgrade``)."""
