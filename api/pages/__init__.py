"""HTML pages of the service: object pages with light curves, recent objects."""
