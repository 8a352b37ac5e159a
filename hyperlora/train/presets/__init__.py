"""Training presets (JSON): only what differs from the dataclass defaults."""
