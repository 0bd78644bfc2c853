"""The framework engines, installed as ``manualprop.adapters``: thin translations of a case to
each framework's real API. Importing this package imports no framework."""
