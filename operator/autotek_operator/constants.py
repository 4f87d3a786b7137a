"""Names shared by the whole operator: API coordinates, labels, annotations, reasons, defaults."""

from __future__ import annotations

GROUP = "autotek.io"
VERSION = "v1alpha1"
PLURAL = "autotekcredentials"
KIND = "AutoTekCredential"
API_VERSION = f"{GROUP}/{VERSION}"
# The cluster-scoped kind: one token, written into many namespaces.
CLUSTER_PLURAL = "clusterautotekcredentials"
CLUSTER_KIND = "ClusterAutoTekCredential"
#: Where Events about a ClusterAutoTekCredential are posted: kube-apiserver accepts an Event about a
#: cluster-scoped object (involvedObject.namespace "") only in `default`, as for Nodes, and
#: `kubectl describe catc NAME` finds it there.
CLUSTER_EVENT_NAMESPACE = "default"

MANAGER = "autotek-operator"

# Target Secret metadata.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANN_CREDENTIAL = "autotek.io/credential"
ANN_EXPIRES_AT = "autotek.io/expires-at"
ANN_REFRESHED_AT = "autotek.io/refreshed-at"
# On a Secret written for a ClusterAutoTekCredential: that kind (absent: AutoTekCredential).
ANN_CREDENTIAL_KIND = "autotek.io/credential-kind"
# Recorded on every target Secret, so that its writes can be undone as the credential asked even
# after the credential is gone (see converge.py): its policies, the keys its template wrote into a
# Secret it merged into, and the credential selector of the operator that wrote it (proof of scope).
ANN_CREATION_POLICY = "autotek.io/creation-policy"
ANN_DELETION_POLICY = "autotek.io/deletion-policy"
ANN_TEMPLATE_KEYS = "autotek.io/template-keys"
ANN_WRITER_SELECTOR = "autotek.io/credential-selector"
# On the AutoTekCredential: a new value asks for a new token now.
ANN_REFRESH_REQUESTED_AT = "autotek.io/refresh-requested-at"

# Target Secret keys.
KEY_ACCESS_TOKEN = "access_token"
KEY_TOKEN_TYPE = "token_type"
KEY_AUTHORIZATION = "authorization"
KEY_EXPIRES_AT = "expires_at"
KEY_SCOPE = "scope"
TOKEN_KEYS = (KEY_ACCESS_TOKEN, KEY_TOKEN_TYPE, KEY_AUTHORIZATION, KEY_EXPIRES_AT, KEY_SCOPE)

# The Ready condition.
CONDITION_READY = "Ready"
REASON_TOKEN_ISSUED = "TokenIssued"
REASON_PENDING = "Pending"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CLIENT_SECRET_NOT_FOUND = "ClientSecretNotFound"
REASON_CLIENT_SECRET_KEY_MISSING = "ClientSecretKeyMissing"
REASON_TOKEN_URL_NOT_ALLOWED = "TokenURLNotAllowed"
REASON_INVALID_CLIENT = "InvalidClient"
REASON_RATE_LIMITED = "RateLimited"
REASON_TOKEN_ENDPOINT_UNAVAILABLE = "TokenEndpointUnavailable"
REASON_INVALID_TOKEN_RESPONSE = "InvalidTokenResponse"
REASON_TARGET_CONFLICT = "TargetConflict"
REASON_TARGET_NOT_FOUND = "TargetNotFound"
REASON_EXPIRED = "Expired"
# ClusterAutoTekCredential only.
REASON_CLIENT_SECRET_NAMESPACE_NOT_ALLOWED = "ClientSecretNamespaceNotAllowed"
REASON_NAMESPACES_NOT_PROVISIONED = "NamespacesNotProvisioned"
REASON_NO_NAMESPACES_SELECTED = "NoNamespacesSelected"
REASON_WRITE_FAILED = "KubernetesAPIError"
#: At most this many entries in status.failedNamespaces (sorted by namespace).
MAX_FAILED_NAMESPACES = 20
#: A namespace the API server reported deleted or Terminating is looked at again after this long
#: (if the namespace watch has not dropped it from the selection by then).
NAMESPACE_GONE_RECHECK_SECONDS = 30

# Event reasons (besides the failure reasons above, which Warning Events reuse).
EVENT_ISSUED = "TokenIssued"
EVENT_ROTATED = "TokenRotated"
EVENT_RESTORED = "SecretRestored"
EVENT_DEFAULT_LIFETIME = "DefaultLifetimeUsed"
EVENT_EXPIRED = "TokenExpired"
EVENT_TEMPLATE_ERROR = "TemplateError"
EVENT_RESTARTED = "RolloutRestarted"
EVENT_RESTART_DEFERRED = "RolloutRestartDeferred"

# The second condition, present when spec.rolloutRestartTargets is not empty.
CONDITION_ROLLOUT = "RolloutRestart"
REASON_RESTARTED = "Restarted"
REASON_RESTART_PENDING = "WaitingForRotation"
REASON_RESTART_DEFERRED = "RestartDeferred"
REASON_RESTART_TARGET_NOT_FOUND = "RestartTargetNotFound"
REASON_RESTART_DISABLED = "RolloutRestartDisabled"
REASON_RESTART_FAILED = "RestartFailed"
ANN_RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"

# Defaults from the product contract.
DEFAULT_TOKEN_URL = "https://api.autograb.com.au/auth-broker/request-token"
DEFAULT_ALLOWED_TOKEN_URLS = ("https://api.autograb.com.au/",)
DEFAULT_RENEW_BEFORE_PERCENTAGE = 33
DEFAULT_LIFETIME_SECONDS = 15 * 60
DEFAULT_CLIENT_ID_KEY = "client_id"
DEFAULT_CLIENT_SECRET_KEY = "client_secret"

# AutoTek's own troubleshooting list, repeated wherever the broker refuses the credentials.
TROUBLESHOOTING_HINTS = (
    "check that client_id and client_secret are correct and belong to the same client",
    "check that the Authorization header is 'Basic base64(client_id:client_secret)'",
    "check that the request is sent as application/x-www-form-urlencoded",
    "check that the body is grant_type=client_credentials",
)
