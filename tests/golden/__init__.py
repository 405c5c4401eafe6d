"""Golden-loss tests: the first training steps of every model variant match a committed loss curve."""
