"""Deployment checks: kustomize overlays, offline schema validation, and the project's own policies."""
