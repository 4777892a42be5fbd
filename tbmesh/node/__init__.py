"""The node: the daemon that runs on each Mac, and what it knows of its machine."""
