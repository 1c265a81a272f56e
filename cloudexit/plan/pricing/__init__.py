"""Price catalogues for leaving cloud object storage: egress, requests, restores, exit programs.

Prices are data, not code: one file per provider in ``data/``, each number with its source,
the date it was read and whether it was confirmed in a primary source. See docs/pricing.md.
"""

from cloudexit.plan.pricing.catalogue import (
    CANONICAL_TIERS,
    Catalogue,
    ExitProgram,
    Fact,
    OfflineDevice,
    PriceBand,
    Restore,
    RestoreTier,
    Span,
    StorageClass,
    Tier,
    catalogue_text,
    known_providers,
    load_catalogue,
    parse_catalogue,
)

__all__ = [
    "CANONICAL_TIERS",
    "Catalogue",
    "ExitProgram",
    "Fact",
    "OfflineDevice",
    "PriceBand",
    "Restore",
    "RestoreTier",
    "Span",
    "StorageClass",
    "Tier",
    "catalogue_text",
    "known_providers",
    "load_catalogue",
    "parse_catalogue",
]
