"""The sessions layer: the store (index, lifecycle, the hooks a step calls), new sessions, the janitor."""
