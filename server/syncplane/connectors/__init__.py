"""Connectors: Dynamics 365 (Dataverse Web API) and Campaign Standard, over aiohttp."""
