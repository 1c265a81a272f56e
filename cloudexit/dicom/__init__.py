"""DICOM bytes: header parsing, the structural scan, and PACS containers."""
