"""The state database and what lives beside it: the file, the patient key, egress meters."""
