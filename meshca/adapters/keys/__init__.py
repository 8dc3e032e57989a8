"""Key backends: where the CA's private keys live."""
