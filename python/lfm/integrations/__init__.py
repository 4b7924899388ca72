"""Optional integrations; each imports its third-party package only when used."""
