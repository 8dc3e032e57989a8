"""A real PostgreSQL server for the tests, started as the postgres user."""
