"""Incident prefetch: each tenant's incidents copied from Defender XDR or Graph into storage, exactly.

By job:

- :mod:`~broker.incidents.ticks`: Microsoft's timestamps as exact 100-ns ticks;
- :mod:`~broker.incidents.dialects`: what differs between Defender and Graph;
- :mod:`~broker.incidents.records`: an incident as received, and the one incident-id rule;
- :mod:`~broker.incidents.upstream`: the client for the upstream Defender/Graph incident APIs (retries, 429s);
- :mod:`~broker.incidents.budget`: the per-tenant call budget every upstream call takes a slot from;
- :mod:`~broker.incidents.store`: the table (and blobs) the incidents are copied into;
- :mod:`~broker.incidents.checkpoint`: the per-tenant state entity and lease;
- :mod:`~broker.incidents.sync`: the algorithm that pages, stores and checkpoints a run, and the triggers;
- :mod:`~broker.incidents.cursors`: the page cursors the HTTP API hands out.

Nothing here knows of HTTP routes: ``broker.http.incidents`` serves what the store holds.
"""
