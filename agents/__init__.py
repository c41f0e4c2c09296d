"""acodm package."""
