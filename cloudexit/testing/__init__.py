"""Synthetic PACS and an embedded S3 server, for the demo, the tests and the benchmarks."""
