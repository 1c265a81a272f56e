"""The state database and what lives beside it: the schema, the file, the patient key, link evidence, per-table SQL."""
