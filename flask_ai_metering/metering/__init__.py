"""Metering: ways to meter AI calls."""
