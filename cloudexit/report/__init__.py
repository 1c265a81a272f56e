"""What is shown to people: the audit, its pages and words, status, signatures."""
