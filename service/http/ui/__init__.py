"""The page a person uses at ``GET /ui``: static HTML, CSS and plain JavaScript shipped in this package."""

from service.http.ui.route import CSP, UiRoute

__all__ = ["CSP", "UiRoute"]
