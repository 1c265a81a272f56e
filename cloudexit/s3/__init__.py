"""The object store as the source: listing, HEADs, the lean GET client, part sizes, deletion
calls, egress meters, one error classification."""
