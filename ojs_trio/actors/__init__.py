"""Actors: long-lived tasks that own their state and talk over memory channels."""
