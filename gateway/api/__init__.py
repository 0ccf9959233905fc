"""The HTTP edge (FastAPI): consents and directory today; letters and messaging with the delivery issue."""
