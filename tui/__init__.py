"""The Textual operator console; it talks to the daemon only through the control API (tui/app.py)."""
