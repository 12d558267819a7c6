"""Registered parts; importing this package registers them."""
