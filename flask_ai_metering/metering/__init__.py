"""The metered call: reserve → call → extract → price → commit, its streams, results and recording."""
