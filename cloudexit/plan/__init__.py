"""The plan: its model, how it is built from the state DB, link measurement, rendering, prices."""
