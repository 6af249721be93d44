"""fmsaccel plugin package."""
