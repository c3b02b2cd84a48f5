"""Framework integrations. Nothing framework-specific lives outside this package."""
