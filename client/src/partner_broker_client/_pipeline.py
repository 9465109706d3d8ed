"""The azure-core pipeline a credential talks to the broker through, sync or async.

Policies, in the Azure SDKs' order: caller headers, user agent (``azsdk-python-partner-broker-client/<v>``,
with the caller's ``user_agent=`` in front), retry, the caller's own bearer token for the broker, and
azure-core's HTTP logging. That logger prints headers from an allowlist (``Authorization`` is redacted) and
never a body, so neither the caller's token nor an issued one reaches a log. azure-core's network-trace
policy, which logs bodies when ``logging_enable`` is on, is deliberately left out.

Retries: 408, 429, 500, 502, 503 and 504 are retried, at most ``retry_total`` times (3 by default), and an
answer's ``Retry-After`` is honoured — up to ``max_retry_after`` seconds (30 by default). A longer wait is
not slept through: the refusal is raised with its ``retry_after`` for the caller to schedule. Asking the
broker again for a token is safe: it only ever hands out a token.
"""

from __future__ import annotations

from typing import Any

from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import (
    AsyncBearerTokenCredentialPolicy,
    AsyncRetryPolicy,
    BearerTokenCredentialPolicy,
    HeadersPolicy,
    HttpLoggingPolicy,
    RetryPolicy,
    UserAgentPolicy,
)

from partner_broker_client._version import VERSION

SDK_MONIKER = f"partner-broker-client/{VERSION}"
DEFAULT_RETRY_TOTAL = 3
DEFAULT_MAX_RETRY_AFTER = 30.0
# azure-core retries a POST only on 500, 503 and 504; the token request is safe to repeat, so it is retried
# on every retryable status (408, 429, 502 too).
_RETRIED_METHODS = frozenset({"POST"})


class _CappedRetryAfter:
    """``is_retry`` for a policy that will not sleep through a ``Retry-After`` above its cap."""

    max_retry_after: float

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        retry_after = self.get_retry_after(response)  # type: ignore[attr-defined]
        if retry_after is not None and retry_after > self.max_retry_after:
            return False
        return bool(super().is_retry(settings, response))  # type: ignore[misc]


class BrokerRetryPolicy(_CappedRetryAfter, RetryPolicy[Any, Any]):
    def __init__(self, *, max_retry_after: float = DEFAULT_MAX_RETRY_AFTER, **kwargs: Any) -> None:
        kwargs.setdefault("retry_total", DEFAULT_RETRY_TOTAL)
        super().__init__(**kwargs)
        self.max_retry_after = max_retry_after
        self._method_whitelist = _RETRIED_METHODS


class AsyncBrokerRetryPolicy(_CappedRetryAfter, AsyncRetryPolicy[Any, Any]):
    def __init__(self, *, max_retry_after: float = DEFAULT_MAX_RETRY_AFTER, **kwargs: Any) -> None:
        kwargs.setdefault("retry_total", DEFAULT_RETRY_TOTAL)
        super().__init__(**kwargs)
        self.max_retry_after = max_retry_after
        self._method_whitelist = _RETRIED_METHODS


def _front(kwargs: dict[str, Any]) -> list[Any]:
    return [
        kwargs.pop("headers_policy", None) or HeadersPolicy(**kwargs),
        kwargs.pop("user_agent_policy", None) or UserAgentPolicy(sdk_moniker=SDK_MONIKER, **kwargs),
    ]


def sync_policies(credential: Any, broker_scope: str, kwargs: dict[str, Any]) -> list[Any]:
    return [
        *_front(kwargs),
        kwargs.pop("retry_policy", None) or BrokerRetryPolicy(**kwargs),
        BearerTokenCredentialPolicy(credential, broker_scope),
        kwargs.pop("http_logging_policy", None) or HttpLoggingPolicy(**kwargs),
    ]


def async_policies(credential: Any, broker_scope: str, kwargs: dict[str, Any]) -> list[Any]:
    return [
        *_front(kwargs),
        kwargs.pop("retry_policy", None) or AsyncBrokerRetryPolicy(**kwargs),
        AsyncBearerTokenCredentialPolicy(credential, broker_scope),
        kwargs.pop("http_logging_policy", None) or HttpLoggingPolicy(**kwargs),
    ]
