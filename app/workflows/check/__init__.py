"""The check workflow (see app/workflows/__init__.py for the layout)."""
