"""Pure decisions about the target Secret: what it must contain, whose it is, whether it matches."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import constants as c
from .errors import TargetConflict
from .spec import CREATION_MERGE, DELETION_RETAIN, CredentialSpec
from .timefmt import format_time, parse_time


@dataclass(frozen=True)
class Owner:
    """The credential a target Secret belongs to, and the scope of the operator writing for it."""

    #: The credential's namespace ("" for a ClusterAutoTekCredential).
    namespace: str
    name: str
    uid: str
    #: AUTOTEK_CREDENTIAL_SELECTOR of the operator that writes the Secret, recorded on it so that
    #: only an operator of the same scope ever cleans it up once the credential is gone.
    selector: str = ""
    #: AutoTekCredential or ClusterAutoTekCredential.
    kind: str = c.KIND

    @property
    def cluster(self) -> bool:
        return self.kind == c.CLUSTER_KIND

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


def claimant(secret: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(kind, name) of the credential a Secret's annotations say it was written for, if any."""
    annotations = _meta(secret).get("annotations") or {}
    name = annotations.get(c.ANN_CREDENTIAL)
    if name is None:
        return None
    return (annotations.get(c.ANN_CREDENTIAL_KIND) or c.KIND, name)


@dataclass(frozen=True, slots=True)
class HeldToken:
    """The token the operator holds for one credential (never logged: repr hides the token)."""

    access_token: str = field(repr=False)
    token_type: str
    scope: str | None
    issued_at: datetime
    expires_at: datetime
    refreshed_at: datetime
    #: The spec generation and client Secret version it was issued for.
    generation: int | None = None
    client_version: str | None = None

    def valid(self, now: datetime) -> bool:
        return now < self.expires_at


@dataclass(frozen=True, slots=True)
class Written:
    """A target Secret as this operator last wrote or confirmed it, kept instead of the Secret.

    Its resourceVersion, the token it holds and its data keys are all a later pass needs while
    nobody else changes it: a change by someone else arrives on the watch with another version
    and replaces this with the Secret itself."""

    version: str
    token: HeldToken
    keys: frozenset[str]


def rotation_patch(spec: CredentialSpec, owner: Owner, token: HeldToken, written: Written) -> dict[str, Any]:
    """The merge patch that turns a Secret we wrote (unchanged since: resourceVersion as a
    precondition) into what ``desired_secret`` would write for ``token`` (Owner policy)."""
    data: dict[str, Any] = dict(token_data(token, spec.target.data))
    for key in written.keys - data.keys():
        data[key] = None
    return {
        "metadata": {"resourceVersion": written.version, "annotations": our_annotations(spec, owner, token)},
        "data": data,
    }


_KEPT_METADATA = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations", "ownerReferences")


def trim_secret(secret: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a Secret a pass needs, for keeping in memory (managedFields and the like are
    dropped: thousands of cached Secrets add up)."""
    if secret is None:
        return None
    meta = secret.get("metadata") or {}
    return {
        "type": secret.get("type"),
        "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
        "data": dict(secret.get("data") or {}),
    }


def b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


def unb64(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


_PLACEHOLDER = re.compile(r"\{\{\s*\.([A-Za-z_]+)\s*\}\}")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
MAX_RENDERED = 64 * 1024


def token_fields(token: HeldToken) -> dict[str, str]:
    """The values templates may use, by name."""
    return {
        c.KEY_ACCESS_TOKEN: token.access_token,
        c.KEY_TOKEN_TYPE: token.token_type,
        c.KEY_AUTHORIZATION: f"Bearer {token.access_token}",
        c.KEY_EXPIRES_AT: format_time(token.expires_at),
        c.KEY_SCOPE: token.scope or "",
    }


def render_templates(templates: Sequence[tuple[str, str]], token: HeldToken) -> tuple[dict[str, str], list[str]]:
    """Render ``target.template.data``: (base64 data for the keys that rendered, problems).

    A bad key or template is left out and reported; the others, and the token keys, are written."""
    fields = token_fields(token)
    rendered: dict[str, str] = {}
    problems: list[str] = []
    for key, template in templates:
        if not _SECRET_KEY.fullmatch(key) or key in (".", "..") or key.startswith(".."):
            problems.append(f"key {key!r} is not a valid Secret key")
            continue
        if key in c.TOKEN_KEYS:
            problems.append(f"key {key!r} is one of the token keys the operator writes")
            continue
        unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - fields.keys())
        if unknown:
            problems.append(
                f"key {key!r} uses unknown field(s) {', '.join(unknown)}; known: {', '.join('.' + f for f in fields)}"
            )
            continue
        value = _PLACEHOLDER.sub(lambda m: fields[m.group(1)], template)
        if "{{" in _PLACEHOLDER.sub("", template):
            problems.append(f"key {key!r} has a malformed placeholder (use {{{{ .access_token }}}})")
            continue
        if len(value) > MAX_RENDERED:
            problems.append(f"key {key!r} renders to more than {MAX_RENDERED} bytes")
            continue
        rendered[key] = b64(value)
    return rendered, problems


def token_data(token: HeldToken, templates: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """The Secret's data keys (base64) for a held token, with the rendered template keys."""
    data = {
        c.KEY_ACCESS_TOKEN: b64(token.access_token),
        c.KEY_TOKEN_TYPE: b64(token.token_type),
        c.KEY_AUTHORIZATION: b64(f"Bearer {token.access_token}"),
        c.KEY_EXPIRES_AT: b64(format_time(token.expires_at)),
    }
    if token.scope is not None:
        data[c.KEY_SCOPE] = b64(token.scope)
    if templates:
        extra, _ = render_templates(templates, token)
        data.update(extra)
    return data


def token_annotations(owner: Owner, token: HeldToken) -> dict[str, str]:
    out = {
        c.ANN_CREDENTIAL: owner.name,
        c.ANN_EXPIRES_AT: format_time(token.expires_at),
        c.ANN_REFRESHED_AT: format_time(token.refreshed_at),
    }
    if owner.cluster:
        out[c.ANN_CREDENTIAL_KIND] = owner.kind
    return out


def template_keys(spec: CredentialSpec) -> list[str]:
    """The data keys the template may write besides the token keys (sorted)."""
    return sorted(
        k for k, _ in spec.target.data if _SECRET_KEY.fullmatch(k) and not k.startswith("..") and k not in c.TOKEN_KEYS
    )


def record_annotations(spec: CredentialSpec, owner: Owner) -> dict[str, str]:
    """What a Secret must record so that its writes can be undone as the credential asked, after
    the credential is gone: the policies, the writing operator's selector and, for a Secret merged
    into, the template's keys."""
    out = {
        c.ANN_CREATION_POLICY: spec.target.creation_policy,
        c.ANN_DELETION_POLICY: spec.target.deletion_policy,
        c.ANN_WRITER_SELECTOR: owner.selector,
    }
    if spec.target.creation_policy == CREATION_MERGE:
        out[c.ANN_TEMPLATE_KEYS] = ",".join(template_keys(spec))
    return out


def our_annotations(spec: CredentialSpec, owner: Owner, token: HeldToken) -> dict[str, str]:
    """Every annotation the operator writes on a target Secret (template annotations aside)."""
    return {**token_annotations(owner, token), **record_annotations(spec, owner)}


#: Every annotation the operator may have written on a target Secret (removed when it is unmerged).
OUR_ANNOTATIONS = (
    c.ANN_CREDENTIAL,
    c.ANN_CREDENTIAL_KIND,
    c.ANN_EXPIRES_AT,
    c.ANN_REFRESHED_AT,
    c.ANN_CREATION_POLICY,
    c.ANN_DELETION_POLICY,
    c.ANN_TEMPLATE_KEYS,
    c.ANN_WRITER_SELECTOR,
)


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": owner.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
    }


def _meta(secret: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (secret or {}).get("metadata") or {}


def _controller_ref(secret: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in _meta(secret).get("ownerReferences") or ():
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return None


def is_ours(secret: Mapping[str, Any], owner: Owner) -> bool:
    """Whether an existing Secret belongs to this credential."""
    ref = _controller_ref(secret)
    if ref is not None:
        return ref.get("uid") == owner.uid
    labels = _meta(secret).get("labels") or {}
    return labels.get(c.LABEL_MANAGED_BY) == c.MANAGER and claimant(secret) == (owner.kind, owner.name)


def check_target(secret: Mapping[str, Any] | None, spec: CredentialSpec, owner: Owner) -> None:
    """Raise TargetConflict when this credential must not write ``secret``; None: may write.

    A missing Secret under Merge is reported by the caller (TargetNotFound)."""
    if secret is None:
        return
    name = spec.target.name
    stype = secret.get("type") or "Opaque"
    claimed = claimant(secret)
    if spec.target.creation_policy == CREATION_MERGE:
        if stype != "Opaque":
            raise TargetConflict(f"Secret {name} has type {stype}; only Opaque Secrets can take a token")
        if claimed not in (None, (owner.kind, owner.name)):
            raise TargetConflict(f"Secret {name} is already managed by {claimed[0]} {claimed[1]}")
        ref = _controller_ref(secret)
        if ref is not None and ref.get("uid") != owner.uid:
            raise TargetConflict(
                f"Secret {name} is controlled by {ref.get('kind')} {ref.get('name')}; Merge will not write to it"
            )
        return
    if not is_ours(secret, owner):
        ref = _controller_ref(secret)
        if ref is not None:
            who = f"{ref.get('kind')} {ref.get('name')}"
        elif claimed:
            who = f"{claimed[0]} {claimed[1]}"
        else:
            who = "someone else"
        raise TargetConflict(
            f"Secret {name} already exists and belongs to {who}; "
            "creationPolicy Owner never touches a Secret it does not own"
        )
    if stype != "Opaque":
        raise TargetConflict(f"Secret {name} has type {stype}; only Opaque Secrets can take a token")


def desired_secret(
    existing: Mapping[str, Any] | None,
    spec: CredentialSpec,
    owner: Owner,
    token: HeldToken,
    namespace: str | None = None,
) -> dict[str, Any]:
    """The whole target Secret (Owner policy) in ``namespace`` (default: the owner's) as it must be
    after a write.

    Labels and annotations that others added to an owned Secret are kept; ours win on a clash.
    Data is exactly the token keys."""
    meta = _meta(existing)
    labels = {**(meta.get("labels") or {}), **spec.target.labels, c.LABEL_MANAGED_BY: c.MANAGER}
    annotations = {**(meta.get("annotations") or {}), **spec.target.annotations, **our_annotations(spec, owner, token)}
    metadata: dict[str, Any] = {
        "name": spec.target.name,
        "namespace": namespace or owner.namespace,
        "labels": labels,
        "annotations": annotations,
    }
    if spec.target.deletion_policy != DELETION_RETAIN:
        metadata["ownerReferences"] = [owner_reference(owner)]
    if meta.get("resourceVersion"):
        metadata["resourceVersion"] = meta["resourceVersion"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata,
        "data": token_data(token, spec.target.data),
    }


def merge_patch(spec: CredentialSpec, owner: Owner, token: HeldToken) -> dict[str, Any]:
    """The merge patch that writes only our keys, labels and annotations (Merge policy)."""
    data: dict[str, Any] = dict(token_data(token, spec.target.data))
    if token.scope is None:
        data[c.KEY_SCOPE] = None
    return {
        "metadata": {
            "labels": {**spec.target.labels, c.LABEL_MANAGED_BY: c.MANAGER},
            "annotations": {**spec.target.annotations, **our_annotations(spec, owner, token)},
        },
        "data": data,
    }


def unmerge_patch(existing: Mapping[str, Any], spec: CredentialSpec | None = None) -> dict[str, Any]:
    """The merge patch that removes what a Merge credential wrote (deletionPolicy Delete): its
    label, its annotations, the token keys and the template's keys (from ``spec``, else as recorded
    on the Secret when the credential is gone). With the Secret's resourceVersion as a precondition,
    so that it applies only to the Secret as it was inspected."""
    meta = _meta(existing)
    data_keys = (existing.get("data") or {}).keys()
    if spec is not None:
        extra = {k for k, _ in spec.target.data}
    else:
        recorded = (meta.get("annotations") or {}).get(c.ANN_TEMPLATE_KEYS) or ""
        extra = {k for k in recorded.split(",") if k}
    ours = set(c.TOKEN_KEYS) | extra
    patch: dict[str, Any] = {
        "metadata": {
            "labels": {c.LABEL_MANAGED_BY: None},
            "annotations": dict.fromkeys(OUR_ANNOTATIONS),
        },
        "data": {k: None for k in sorted(ours) if k in data_keys},
    }
    if meta.get("resourceVersion"):
        patch["metadata"]["resourceVersion"] = meta["resourceVersion"]
    return patch


def matches(existing: Mapping[str, Any] | None, spec: CredentialSpec, owner: Owner, token: HeldToken) -> bool:
    """Whether the Secret already holds exactly what we would write (no write needed)."""
    if existing is None:
        return False
    meta = _meta(existing)
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    data = existing.get("data") or {}
    want_data = token_data(token, spec.target.data)
    if spec.target.creation_policy == CREATION_MERGE:
        if any(data.get(k) != v for k, v in want_data.items()):
            return False
        if token.scope is None and c.KEY_SCOPE in data:
            return False
    elif dict(data) != want_data:
        return False
    want_labels = {**spec.target.labels, c.LABEL_MANAGED_BY: c.MANAGER}
    want_annotations = {**spec.target.annotations, **our_annotations(spec, owner, token)}
    if any(labels.get(k) != v for k, v in want_labels.items()):
        return False
    if any(annotations.get(k) != v for k, v in want_annotations.items()):
        return False
    if spec.target.creation_policy != CREATION_MERGE:
        refs = meta.get("ownerReferences") or []
        has_ref = any(isinstance(r, Mapping) and r.get("uid") == owner.uid for r in refs)
        if has_ref != (spec.target.deletion_policy != DELETION_RETAIN):
            return False
        if (existing.get("type") or "Opaque") != "Opaque":
            return False
    return True


def held_from_secret(secret: Mapping[str, Any] | None, owner: Owner) -> HeldToken | None:
    """Recover the token a Secret holds (after an operator restart), if it is ours and whole."""
    if secret is None:
        return None
    meta = _meta(secret)
    annotations = meta.get("annotations") or {}
    if claimant(secret) != (owner.kind, owner.name):
        return None
    data = secret.get("data") or {}
    access_token = unb64(data.get(c.KEY_ACCESS_TOKEN))
    token_type = unb64(data.get(c.KEY_TOKEN_TYPE))
    expires_at = parse_time(annotations.get(c.ANN_EXPIRES_AT))
    refreshed_at = parse_time(annotations.get(c.ANN_REFRESHED_AT))
    if not access_token or not token_type or expires_at is None or refreshed_at is None:
        return None
    if unb64(data.get(c.KEY_AUTHORIZATION)) != f"Bearer {access_token}":
        return None
    if parse_time(unb64(data.get(c.KEY_EXPIRES_AT))) != expires_at:
        return None
    scope = unb64(data.get(c.KEY_SCOPE)) if c.KEY_SCOPE in data else None
    return HeldToken(
        access_token=access_token,
        token_type=token_type,
        scope=scope,
        issued_at=refreshed_at,
        expires_at=expires_at,
        refreshed_at=refreshed_at,
    )
