"""backups layer (see DESIGN.md)."""
