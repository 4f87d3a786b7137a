"""autotek-operator: keeps AutoTek OAuth 2.0 bearer tokens fresh in Kubernetes Secrets."""

__version__ = "0.1.0"
