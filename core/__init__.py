"""Small shared core: settings, the model contract and registry, the CLI."""
