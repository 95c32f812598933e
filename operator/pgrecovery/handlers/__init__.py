"""handlers layer (see DESIGN.md)."""
