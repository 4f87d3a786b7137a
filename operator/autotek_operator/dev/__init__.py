"""Development doubles: an embedded Kubernetes API emulator and a token endpoint."""
