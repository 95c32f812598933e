"""cluster layer (see DESIGN.md)."""
