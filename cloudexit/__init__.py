"""cloudexit: move a PACS out of cloud object storage, verified, and prove it."""

__version__ = "0.1.0"
