"""Azure SDK credentials that get customer-tenant tokens from the partner token broker.

``BrokerCredential`` here is the sync ``TokenCredential``; ``partner_broker_client.aio.BrokerCredential`` is
its async twin (``AsyncTokenCredential``). Both run on azure-core pipelines and depend on nothing but
azure-core and requests.
"""

from partner_broker_client._credential import BrokerCredential
from partner_broker_client._protocol import BrokerAuthenticationError
from partner_broker_client._version import VERSION

__version__ = VERSION
__all__ = ["VERSION", "BrokerAuthenticationError", "BrokerCredential", "__version__"]
