"""The download path: worker processes, the lean GET client, small objects many at once."""
