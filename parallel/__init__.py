"""dist-train."""
