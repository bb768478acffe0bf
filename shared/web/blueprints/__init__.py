"""Trigger wiring only: each module owns one `func.Blueprint` for one area of the app."""
