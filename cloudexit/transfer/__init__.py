"""The download path: worker processes, one object fetched, verified and placed; ranges; small objects many at once; zip members."""
