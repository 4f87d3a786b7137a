"""Tests of the Helm chart in charts/autotek-operator (import the helpers as ``from helm import helmkit``)."""
