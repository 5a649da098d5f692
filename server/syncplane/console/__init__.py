"""The web console: the Workflows page and its workflow and edit pages, served over HTTP
by the same process as the gRPC API and calling the same service layer (syncplane.service).

Handlers are thin (console.app); what a page shows is computed by pure functions
(console.present); errors are mapped once, through the gRPC interceptor's mapping
(console.errors); auth and CSRF live in console.auth.
"""

from syncplane.console.app import ConsoleConfig, announce_console, create_console, serve_console, start_console

__all__ = ["ConsoleConfig", "announce_console", "create_console", "serve_console", "start_console"]
