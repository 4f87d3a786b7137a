"""One error family for everything that can go wrong in a pass.

Each error carries the status reason it maps to and whether it is worth retrying soon
(retryable: network, 5xx, 429, malformed answers) or only slowly / after a change
(credential refusals, missing inputs, invalid spec). Messages never contain secrets or tokens.
"""

from __future__ import annotations

from . import constants as c


class AutoTekError(Exception):
    """Base class: a failure with a status reason and a retry class."""

    reason: str = c.REASON_TOKEN_ENDPOINT_UNAVAILABLE
    #: "transient" (fast backoff), "credential" (slow backoff), "permanent" (wait for a change).
    retry_class: str = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None, oauth_error: str | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.oauth_error = oauth_error

    @property
    def retryable(self) -> bool:
        return self.retry_class == "transient"


class InvalidSpec(AutoTekError):
    reason = c.REASON_INVALID_SPEC
    retry_class = "permanent"


class ClientSecretNotFound(AutoTekError):
    reason = c.REASON_CLIENT_SECRET_NOT_FOUND
    retry_class = "credential"


class ClientSecretKeyMissing(AutoTekError):
    reason = c.REASON_CLIENT_SECRET_KEY_MISSING
    retry_class = "credential"


class TokenURLNotAllowed(AutoTekError):
    reason = c.REASON_TOKEN_URL_NOT_ALLOWED
    retry_class = "permanent"


class InvalidClient(AutoTekError):
    """The broker refused the client credentials (400 invalid_client & co, 401, 403)."""

    reason = c.REASON_INVALID_CLIENT
    retry_class = "credential"


class RateLimited(AutoTekError):
    reason = c.REASON_RATE_LIMITED
    retry_class = "transient"


class TokenEndpointUnavailable(AutoTekError):
    reason = c.REASON_TOKEN_ENDPOINT_UNAVAILABLE
    retry_class = "transient"


class InvalidTokenResponse(AutoTekError):
    reason = c.REASON_INVALID_TOKEN_RESPONSE
    retry_class = "transient"


class TargetConflict(AutoTekError):
    reason = c.REASON_TARGET_CONFLICT
    retry_class = "credential"


class TargetNotFound(AutoTekError):
    reason = c.REASON_TARGET_NOT_FOUND
    retry_class = "credential"


class KubernetesAPIError(AutoTekError):
    """The Kubernetes API failed in a way worth retrying (5xx, timeouts, conflicts)."""

    reason = c.REASON_PENDING
    retry_class = "transient"


class NamespaceGone(KubernetesAPIError):
    """The API server refused a write into a namespace that is deleted or being deleted (404 for the
    namespace, 403 NamespaceTerminating): the namespace watch drops it from the selection."""


class ClientSecretNamespaceNotAllowed(AutoTekError):
    """A ClusterAutoTekCredential names a client Secret outside AUTOTEK_CLUSTER_CREDENTIAL_NAMESPACES."""

    reason = c.REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED
    retry_class = "permanent"
