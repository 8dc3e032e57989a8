"""Vault (OpenBao) adapters: the shared client, the PKI upstream, transit-held keys."""
