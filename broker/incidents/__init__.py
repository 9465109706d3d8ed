"""Incident prefetch: each tenant's incidents copied from Defender XDR or Graph into storage, exactly."""
