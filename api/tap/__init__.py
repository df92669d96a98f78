"""TAP protocol pieces that are not HTTP: parameters."""
