"""Async twin of :mod:`partner_broker_client`: ``BrokerCredential`` as an ``AsyncTokenCredential``."""

from partner_broker_client._protocol import BrokerAuthenticationError
from partner_broker_client.aio._credential import BrokerCredential

__all__ = ["BrokerAuthenticationError", "BrokerCredential"]
