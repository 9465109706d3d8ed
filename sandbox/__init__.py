"""Local stand-ins for the Microsoft cloud: Entra ID, managed identity, Key Vault, Defender XDR and Graph.

Used by the tests, the benchmarks and `make run`. The broker never imports this package; it reaches the
stand-ins only through the settings a real deployment also has (authority host, vault URL, API base URLs,
the managed-identity endpoint) and the standard CA-bundle variables.
"""
