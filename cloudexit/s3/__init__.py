"""The object store as the source: listing, GETs, HEADs, part sizes, deletion calls."""
