"""Discharge gateway: hospital discharge letters in, per-recipient FHIR R4 messages out."""

__all__ = ["__version__"]

__version__ = "0.1.0"
