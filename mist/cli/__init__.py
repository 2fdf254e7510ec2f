"""Layer 6: the `mist` command line."""
