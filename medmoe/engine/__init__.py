"""The inference engine: what makes a loaded model generate fast, applied through seams the core declares."""
