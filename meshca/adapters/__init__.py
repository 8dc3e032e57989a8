"""Adapters: the edges of meshca that speak to transports, clusters, vaults and databases."""
