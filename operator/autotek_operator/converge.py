"""Pure: what to do with the Secrets the operator wrote, given what the live credentials want.

Level-triggered convergence. On every complete list, the Secrets that carry the operator's marks
are compared with the credentials that exist: a Secret written for a credential that no longer
wants it (deleted while no operator watched, or while a watch was down past a 410) is handled by
the deletion policy recorded on it when it was written. Nothing here does I/O: the runtime
confirms each decision with a read of the credential before it writes anything.

The rule is phrased as "credential key -> namespaces it wants its Secret in", so that a
ClusterAutoTekCredential (key ``("", name)``), writing into many namespaces, fits it as well as an
AutoTekCredential (key ``(namespace, name)``) writing into its own: a namespace that leaves a
cluster credential's selection is, for that namespace, exactly a credential that is gone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import constants as c
from .spec import CREATION_MERGE, CREATION_OWNER, DELETION_DELETE, DELETION_RETAIN

Key = tuple[str, str]

#: A DNS subdomain name (RFC 1123), as Kubernetes requires of a credential's name.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# Actions.
#: Read the credential; if it is gone, remove exactly what the operator merged into the Secret.
UNMERGE = "unmerge"
#: Read the credential; if it is gone, delete the Secret (it was created by the operator and owned).
DELETE = "delete"
#: Nothing to do (the credential is alive, the policy keeps the Secret, or it is another scope's).
LEAVE = "leave"
#: The Secret carries the operator's marks but not enough of them to act on: log once, leave it.
BAD_INPUT = "bad-input"


@dataclass(frozen=True, slots=True)
class Mark:
    """What the operator keeps in memory of a Secret that carries its marks (and nothing else)."""

    credential: str
    creation_policy: str | None
    deletion_policy: str | None
    selector: str | None
    has_owner_reference: bool
    #: The kind of credential it was written for (autotek.io/credential-kind, absent: AutoTekCredential).
    kind: str = c.KIND

    def credential_key(self, namespace: str) -> Key:
        """The key of the credential a Secret in ``namespace`` was written for."""
        return ("", self.credential) if self.kind == c.CLUSTER_KIND else (namespace, self.credential)


@dataclass(frozen=True, slots=True)
class Action:
    secret: Key
    action: str
    #: The credential the Secret was written for (None when its mark is not a valid name).
    credential: Key | None
    why: str


#: Shared copies of the few distinct values marks hold (thousands of Secrets repeat them).
_INTERNED: dict[str, str] = {}


def _intern(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    if len(_INTERNED) < 4096:
        return _INTERNED.setdefault(value, value)
    return _INTERNED.get(value, value)


def mark_of(secret: Mapping[str, Any]) -> Mark | None:
    """The operator's marks on a Secret (managed-by label and credential annotation), or None."""
    meta = secret.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping) or labels.get(c.LABEL_MANAGED_BY) != c.MANAGER:
        return None
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping) or c.ANN_CREDENTIAL not in annotations:
        return None
    kind = c.CLUSTER_KIND if annotations.get(c.ANN_CREDENTIAL_KIND) == c.CLUSTER_KIND else c.KIND
    refs = meta.get("ownerReferences") or ()
    owned = any(
        isinstance(r, Mapping) and r.get("kind") == kind and str(r.get("apiVersion", "")).startswith(c.GROUP + "/")
        for r in (refs if isinstance(refs, list) else ())
    )
    credential = annotations.get(c.ANN_CREDENTIAL)
    return Mark(
        credential=credential if isinstance(credential, str) else repr(credential),
        creation_policy=_intern(annotations.get(c.ANN_CREATION_POLICY)),
        deletion_policy=_intern(annotations.get(c.ANN_DELETION_POLICY)),
        selector=_intern(annotations.get(c.ANN_WRITER_SELECTOR)),
        has_owner_reference=owned,
        kind=kind,
    )


def valid_name(name: str) -> bool:
    return len(name) <= 253 and _NAME.fullmatch(name) is not None


def decide(secret: Key, mark: Mark, wanted: Mapping[Key, frozenset[str]], selector: str) -> Action:
    """What to do with one marked Secret. ``wanted``: each live credential in this operator's scope
    and the namespaces it wants its Secret in; ``selector``: this operator's credential selector."""
    ns = secret[0]
    if mark.selector is not None and mark.selector != selector:
        # Another operator's scope: its credentials are not ours to judge, nor its Secrets to report.
        return Action(secret, LEAVE, None, "written by an operator with another credential selector")
    if not valid_name(mark.credential):
        return Action(secret, BAD_INPUT, None, f"its {c.ANN_CREDENTIAL} annotation is not a valid name")
    key = mark.credential_key(ns)
    if ns in wanted.get(key, frozenset()):
        return Action(secret, LEAVE, key, "the credential still wants it")
    if mark.selector is None or mark.creation_policy is None or mark.deletion_policy is None:
        return Action(
            secret,
            BAD_INPUT,
            key,
            "written by an older version that did not record the deletion policy and scope; left as it is",
        )
    if mark.deletion_policy == DELETION_RETAIN:
        return Action(secret, LEAVE, key, "deletionPolicy Retain")
    if mark.deletion_policy != DELETION_DELETE or mark.creation_policy not in (CREATION_OWNER, CREATION_MERGE):
        return Action(secret, BAD_INPUT, key, "its recorded policies are not ones the operator writes")
    if mark.creation_policy == CREATION_MERGE:
        return Action(secret, UNMERGE, key, "creationPolicy Merge, deletionPolicy Delete")
    if key not in wanted and mark.has_owner_reference:
        # The owner is gone: garbage collection deletes the Secret through its owner reference.
        return Action(secret, LEAVE, key, "owned: garbage collection removes it with its owner")
    return Action(secret, DELETE, key, "creationPolicy Owner, deletionPolicy Delete")


def converge(
    marked: Mapping[Key, Mark],
    wanted: Mapping[Key, frozenset[str]],
    selector: str,
    namespace: str | None = None,
) -> list[Action]:
    """The actions for every marked Secret in ``namespace`` (None: all) other than LEAVE."""
    out = []
    for skey, mark in marked.items():
        if namespace is not None and skey[0] != namespace:
            continue
        action = decide(skey, mark, wanted, selector)
        if action.action != LEAVE:
            out.append(action)
    return sorted(out, key=lambda a: a.secret)
