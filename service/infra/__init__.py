"""What the core runs on: caches (in-process and Redis), admission, metrics, logging, the
HTTP server's protocol."""
