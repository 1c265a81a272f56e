"""The migrate engine: dispatch, result policy, bandwidth timetable, restores, delivery."""
