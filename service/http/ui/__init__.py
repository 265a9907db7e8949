"""The page a person uses at ``GET /ui``: static HTML, CSS and plain JavaScript shipped in this package."""

from service.http.ui.route import CSP, PREFIX, UiRoute

__all__ = ["CSP", "PREFIX", "UiRoute"]
